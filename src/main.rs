//! The `greyhound` command.

fn main() {
    eprintln!(
        "greyhound: the server is not built yet; this release contains the engine library only"
    );
    std::process::exit(2);
}
