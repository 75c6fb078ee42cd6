//! The `tickgate` binary: parse arguments, hand over to the library (see `cli.rs`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let code = match tickgate::cli::parse_args(std::env::args_os()) {
        Ok(cli) => tickgate::cli::run(cli),
        Err(code) => code,
    };
    std::process::exit(code);
}
