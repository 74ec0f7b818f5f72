fn main() {
    eprintln!("flint: not built yet");
    std::process::exit(1);
}
