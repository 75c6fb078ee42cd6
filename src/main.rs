//! The `tickgate` binary: parse arguments, hand over to the library (see `cli.rs`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    use clap::Parser;
    let cli = tickgate::cli::Cli::parse();
    std::process::exit(tickgate::cli::run(cli));
}
