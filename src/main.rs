//! The `kips` binary: parse the command line, dispatch, turn the outcome into an exit code.

use std::process::ExitCode;

use kips::Command;

fn main() -> ExitCode {
    let command = match kips::cli::parse_args() {
        Ok(command) => command,
        Err(usage) => {
            eprintln!("kips: {usage}");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kips: {error:#}");
            // The bridge and the relay tell a refused key or an unknown hybrid connection
            // apart by their exit status; everything else is 1.
            ExitCode::from(kips::bridge::exit_code(&error))
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Webhook(config, log_format) => {
            kips::logging::init(log_format);
            runtime()?.block_on(kips::webhook::run(*config))
        }
        Command::Inject(command) => kips::inject_manifests(&command),
        Command::InitNet(config) => Ok(kips::initnet::run(config)?),
        Command::Connect(config) => runtime()?.block_on(kips::dev::connect(config)),
        Command::Redirect(config) => runtime()?.block_on(kips::dev::redirect(config)),
        Command::Revert(config) => runtime()?.block_on(kips::dev::revert(config)),
        Command::Status(config) => runtime()?.block_on(kips::dev::status(config)),
        Command::Certs(command) => runtime()?.block_on(kips::certs::run(command)),
        Command::Doctor(config) => runtime()?.block_on(kips::dev::doctor(config)),
        Command::Expose(config) => runtime()?.block_on(kips::dev::expose(config)),
        Command::Bridge(options, log_format) => {
            kips::logging::init(log_format);
            let config = options.load()?;
            Ok(runtime()?.block_on(kips::bridge::run(config))?)
        }
        Command::Relay(config, log_format) => {
            kips::logging::init(log_format);
            Ok(runtime()?.block_on(kips::relay::run(config))?)
        }
        Command::Completion(request) => {
            kips::cli::write_completion(&request, &mut std::io::stdout().lock());
            Ok(())
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
