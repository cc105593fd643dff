//! The short, bounded version of issue 13's soak test: `loadtest/soak.sh` for about 40 s on
//! this build's binary, with the script's own mixed traffic (the load generator is another
//! package, not built for these tests). Kills -9 and restarts the server at random moments
//! and checks after each restart that every triplet whitelisted before the last completed
//! snapshot is still known. The 30-minute run is `loadtest/soak.sh 30` (docs/BENCHMARKS.md).

use std::process::Command;

#[test]
fn soak_kill_9_and_restart_loses_no_snapshotted_whitelisting() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/loadtest/soak.sh"))
        .arg("0.7")
        .env("GREYHOUND", env!("CARGO_BIN_EXE_greyhound"))
        .env("LOADTEST", "")
        .env_remove("RUST_LOG")
        .output()
        .expect("run loadtest/soak.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "soak failed ({}):\n{report}",
        out.status
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("soak: ") && l.contains(" cycles "))
        .unwrap_or_else(|| panic!("no summary:\n{report}"));
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = summary.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| w.trim_end_matches(',') == word)
            .unwrap_or_else(|| panic!("no {word:?} in {summary:?}"));
        words[at - 1].parse().unwrap()
    };
    assert!(summary.ends_with("lost 0"), "{report}");
    assert!(number_before("cycles") >= 3, "{report}");
    assert!(number_before("decisions") > 0, "{report}");
    assert!(
        number_before("whitelisted") > 0,
        "nothing was ever checked:\n{report}"
    );
}
