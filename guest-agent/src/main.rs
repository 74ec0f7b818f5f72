fn main() {
    eprintln!("flint-agent: not built yet");
    std::process::exit(1);
}
