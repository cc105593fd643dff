//! `greyhound-loadtest`: load generation and capacity planning for Greyhound.
//!
//! Not built yet: `run`, `ceiling` and `plan` arrive with their own issue. Until then the
//! binary says so and exits non-zero, so no script mistakes it for a measurement.

fn main() {
    eprintln!("greyhound-loadtest: not implemented yet (run, ceiling and plan come with the load-test issue)");
    std::process::exit(2);
}
