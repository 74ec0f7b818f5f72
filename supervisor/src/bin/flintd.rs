fn main() {
    eprintln!("flintd: not built yet");
    std::process::exit(1);
}
