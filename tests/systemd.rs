//! `contrib/greyhound.service` checked by systemd's own tools, which work offline (no running
//! systemd needed, as in a container): `systemd-analyze verify` must accept it without a
//! single warning (unknown keys and bad values are only warnings there), and
//! `systemd-analyze security --offline=true` must rate its hardening well.

use std::path::Path;
use std::process::Command;

const UNIT: &str = include_str!("../contrib/greyhound.service");

/// The exposure rating (0 = locked down, 10 = unprotected) above which the test fails. The
/// unit rates 1.2 with systemd 252; a removed hardening option shows up here.
const MAX_EXPOSURE: f64 = 2.0;

/// The unit in a temp dir, with `ExecStart` pointing at the binary under test (`verify`
/// checks that the program exists and is executable).
fn unit_file(tag: &str) -> (std::path::PathBuf, impl Drop) {
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    assert!(
        Path::new("/usr/bin/systemd-analyze").exists(),
        "systemd-analyze is missing: run tests/run.sh, which installs Debian's systemd package"
    );
    assert_eq!(
        UNIT.matches("ExecStart=/usr/local/bin/greyhound ").count(),
        1,
        "the unit runs /usr/local/bin/greyhound"
    );
    let dir = std::env::temp_dir().join(format!("gh-systemd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join("greyhound.service");
    let unit = UNIT.replace(
        "ExecStart=/usr/local/bin/greyhound ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_greyhound")),
    );
    std::fs::write(&path, unit).expect("write unit");
    (path, Cleanup(dir))
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_warnings() {
    let (path, _cleanup) = unit_file("verify");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify: {}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn systemd_analyze_security_rates_the_unit_hardened() {
    let (path, _cleanup) = unit_file("security");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for greyhound.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in systemd-analyze security output ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} > {MAX_EXPOSURE}: a hardening option was lost?\n{text}"
    );
}
