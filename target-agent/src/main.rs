fn main() -> std::process::ExitCode {
    target_agent::cli::main()
}
