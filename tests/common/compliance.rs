//! libiscsi's compliance runner (`iscsi-test-cu`): the SCSI suites a
//! block target must pass, and one suite's CUnit summary parsed into
//! verdicts. Shared by the single-node and the replicated compliance tests.
#![allow(dead_code)]

use std::process::Command;

pub const INI1: &str = "iqn.2026-11.io.basalt.test:cu1";
pub const INI2: &str = "iqn.2026-11.io.basalt.test:cu2";

/// The SCSI suites we claim. (This libiscsi has no separate ReportLUNs
/// suite; REPORT LUNS is covered by the raw-client tests.)
pub const SCSI_SUITES: &[&str] = &[
    "TestUnitReady",
    "Inquiry",
    "ReadCapacity10",
    "ReadCapacity16",
    "Read6",
    "Read10",
    "Read12",
    "Read16",
    "Write10",
    "Write12",
    "Write16",
    "ModeSense6",
    "Mandatory",
    "WriteSame10",
    "WriteSame16",
    "Unmap",
    "CompareAndWrite",
    "Verify10",
    "Verify12",
    "Verify16",
    "WriteVerify10",
    "WriteVerify12",
    "WriteVerify16",
    "GetLBAStatus",
];

/// Tests known to fail, with the reason (none: every listed suite passes).
pub const KNOWN_FAILURES: &[(&str, &str)] = &[];

#[derive(Debug)]
pub struct SuiteResult {
    pub suite: String,
    pub ran: u32,
    pub passed: u32,
    pub failed: Vec<String>,
    pub skipped: u32,
}

/// Runs one suite against `url`; its output is printed when a test fails.
pub fn run_suite(url: &str, suite: &str) -> SuiteResult {
    let out = Command::new("iscsi-test-cu")
        .args(["--dataloss", "-i", INI1, "-I", INI2, "-t", suite, url])
        .output()
        .expect("run iscsi-test-cu");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let summary = text
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .unwrap_or_else(|| panic!("{suite}: no CUnit summary in:\n{text}"));
    // "tests  Total  Ran  Passed  Failed  Inactive"
    let n: Vec<u32> = summary.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    let mut failed = Vec::new();
    let mut skipped = 0;
    let body = text.split_once("Suite: ").map(|(_, b)| b).unwrap_or("");
    for chunk in body.split("  Test: ").skip(1) {
        let (name, after) = chunk.split_once(" ...").unwrap_or((chunk, ""));
        // The verdict is "passed" or "FAILED" at the start of a line (or
        // right after "..."); "[FAILED] ..." lines are expected-error logs.
        let verdict = after.lines().enumerate().find_map(|(i, l)| {
            let l = if i == 0 { l.trim_start() } else { l };
            if l.starts_with("passed") {
                Some(true)
            } else if l.starts_with("FAILED") {
                Some(false)
            } else {
                None
            }
        });
        // libiscsi prints its PERSISTENT RESERVE probe skip once per run;
        // it belongs to no test.
        let skip = after.lines().any(|l| l.contains("[SKIPPED]") && !l.contains("PERSISTENT RESERVE IN"));
        match verdict {
            Some(false) | None => failed.push(name.to_string()),
            Some(true) if skip => skipped += 1,
            Some(true) => {}
        }
    }
    let r = SuiteResult { suite: suite.to_string(), ran: n[1], passed: n[2], failed, skipped };
    assert_eq!(r.ran, n[0], "{suite}: not every test ran:\n{text}");
    assert_eq!(r.failed.len() as u32, n[3], "{suite}: failure parse disagrees with CUnit:\n{text}");
    assert!(r.ran > 0, "{suite}: no tests ran (unknown suite name?)");
    if !r.failed.is_empty() {
        eprintln!("--- {suite} on {url} ---\n{text}");
    }
    r
}
