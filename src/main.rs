fn main() -> std::process::ExitCode {
    match kips::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kips: {error:#}");
            std::process::ExitCode::from(kips::bridge::exit_code(&error))
        }
    }
}
