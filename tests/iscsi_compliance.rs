//! libiscsi's compliance suite (`iscsi-test-cu`) against a real basaltd:
//! the SCSI suites a block target must pass, and the whole iSCSI family.
//! Each suite's CUnit summary is parsed; failures must be exactly the
//! known ones (none, but for one libiscsi bug documented below).

mod common;

use common::Daemon;
use common::compliance::{KNOWN_FAILURES, SCSI_SUITES, SuiteResult, run_suite};

fn check(results: &[SuiteResult]) {
    eprintln!("{:<28} {:>5} {:>5} {:>5} {:>5}", "suite", "ran", "pass", "FAIL", "skip");
    for r in results {
        eprintln!(
            "{:<28} {:>5} {:>5} {:>5} {:>5} {}",
            r.suite,
            r.ran,
            r.passed,
            r.failed.len(),
            r.skipped,
            r.failed.join(",")
        );
    }
    for r in results {
        let expected: Vec<&str> =
            KNOWN_FAILURES.iter().filter(|(s, _)| *s == r.suite).map(|(_, t)| *t).collect();
        assert_eq!(r.failed, expected, "{}: unexpected failures", r.suite);
    }
}

#[test]
fn scsi_suites_pass() {
    if !common::require("iscsi-test-cu") {
        return;
    }
    // Small LUN: several suites write or read the whole medium.
    let d = Daemon::start("64M", &[]);
    let url = d.iscsi_url();
    let results: Vec<SuiteResult> =
        SCSI_SUITES.iter().map(|s| run_suite(&url, &format!("SCSI.{s}"))).collect();
    check(&results);
    assert!(!d.log_text().contains("panicked"));
}

#[test]
fn iscsi_family_passes() {
    if !common::require("iscsi-test-cu") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let r = run_suite(&d.iscsi_url(), "iSCSI");
    assert_eq!(r.ran, 15, "the iSCSI family has 15 tests in libiscsi 1.19");
    check(&[r]);
    assert!(!d.log_text().contains("panicked"));
}
