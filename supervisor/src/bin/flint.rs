//! `flint`: the command line for flintd's API (the commands live in `flint_supervisor::cli`).

fn main() -> std::process::ExitCode {
    flint_supervisor::cli::main()
}
