fn main() -> std::process::ExitCode {
    source_agent::cli::main()
}
