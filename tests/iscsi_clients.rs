//! Real iSCSI clients (libiscsi-bin) against a real basaltd: discovery,
//! INQUIRY and VPD pages, READ CAPACITY(16), CHAP one-way and mutual.

mod common;

use common::{Daemon, run, run_ok, stdout};

const INI: &str = "iqn.2026-11.io.basalt.test:clients";

#[test]
fn discovery_lists_the_volume_target() {
    if !common::require("iscsi-ls") {
        return;
    }
    let d = Daemon::start("64M", &["--volume=disco"]);
    let portal = format!("iscsi://127.0.0.1:{}", d.iscsi_port);
    let out = stdout(&run_ok("iscsi-ls", &["-i", INI, &portal]));
    assert_eq!(out.trim(), format!("Target:iqn.2026-11.io.basalt:disco Portal:127.0.0.1:{},1", d.iscsi_port));
    // With -s the tool also logs in and lists the LUN and its size.
    let out = stdout(&run_ok("iscsi-ls", &["-i", INI, "-s", &portal]));
    assert!(out.contains("Lun:0    Type:DIRECT_ACCESS (Size:63M)"), "{out}");
}

#[test]
fn inquiry_standard_and_vpd_pages() {
    if !common::require("iscsi-inq") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let url = d.iscsi_url();
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, &url]));
    for line in [
        "Peripheral Device Type:DIRECT_ACCESS",
        "Version:6 ",
        "HiSup:1",
        "Protect:0",
        "CmdQue:1",
        "Vendor:BASALT  ",
        "Product:VOLUME          ",
        "Revision:0001",
        "Version Descriptor:04c0 SBC-3",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, "-e", "1", "-c", "0", &url]));
    let pages: Vec<&str> = out.lines().collect();
    assert_eq!(
        pages,
        vec![
            "Page:0x00 SUPPORTED_VPD_PAGES",
            "Page:0x80 UNIT_SERIAL_NUMBER",
            "Page:0x83 DEVICE_IDENTIFICATION",
            "Page:0xb0 BLOCK_LIMITS",
            "Page:0xb1 BLOCK_DEVICE_CHARACTERISTICS",
            "Page:0xb2 LOGICAL_BLOCK_PROVISIONING",
        ]
    );
    // (iscsi-inq takes the page code in decimal.)
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, "-e", "1", "-c", "128", &url]));
    assert_eq!(out, "Unit Serial Number:[BASALT0000000001]\n");
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, "-e", "1", "-c", "131", &url]));
    assert!(
        out.contains("Designator Type:(8) SCSI_NAME_STRING\nDesignator:[iqn.2026-11.io.basalt:demo]"),
        "{out}"
    );
    assert!(
        out.contains("Designator Type:(1) T10_VENDORT_ID\nDesignator:[BASALT  BASALT0000000001]"),
        "{out}"
    );
    assert!(out.contains("Designator Type:(3) NAA"), "{out}");
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, "-e", "1", "-c", "176", &url]));
    for line in [
        "wsnz:1",
        "maximum compare and write length:128",
        "maximum transfer length:65536",
        "maximum unmap lba count:524288",
        "maximum unmap block descriptor count:256",
        "optimal unmap granularity:8",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
    }
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, "-e", "1", "-c", "177", &url]));
    assert_eq!(out, "Medium Rotation Rate:1RPM\n");
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, "-e", "1", "-c", "178", &url]));
    assert_eq!(
        out,
        "Threshold Exponent:0\nlbpu:1\nlbpws:1\nlbpws10:1\nlbprz:1\nanc_sup:0\ndp:0\nprovisioning type:2\n"
    );
    // An unknown VPD page is an error, not empty data.
    let bad = run("iscsi-inq", &["-i", INI, "-e", "1", "-c", "153", &url]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_FIELD_IN_CDB(0x2400)"), "{bad:?}");
}

#[test]
fn read_capacity16_reports_exact_size_and_thin_provisioning() {
    if !common::require("iscsi-readcapacity16") {
        return;
    }
    let d = Daemon::start("96M", &[]);
    let out = stdout(&run_ok("iscsi-readcapacity16", &["-i", INI, &d.iscsi_url()]));
    let expect = format!(
        "RETURNED LOGICAL BLOCK ADDRESS:{}\nLOGICAL BLOCK LENGTH IN BYTES:512\nP_TYPE:0 PROT_EN:0\n\
         P_I_EXPONENT:0 LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:0\nLBPME:1 LBPRZ:1\n\
         LOWEST ALIGNED LOGICAL BLOCK ADDRESS:0\nTotal size:{}\n",
        96 * 2048 - 1,
        96u64 << 20
    );
    assert_eq!(out, expect);
}

fn chap_daemon() -> Daemon {
    Daemon::start(
        "64M",
        &[
            "--chap-user=alice",
            "--chap-secret=alice-secret-123",
            "--chap-mutual-user=basalt",
            "--chap-mutual-secret=target-secret-456",
        ],
    )
}

#[test]
fn chap_one_way_and_mutual() {
    if !common::require("iscsi-inq") {
        return;
    }
    let d = chap_daemon();
    let with = |cred: &str, q: &str| format!("iscsi://{cred}@127.0.0.1:{}/{}/0{q}", d.iscsi_port, d.iqn());
    // One-way: the right secret logs in.
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, &with("alice%alice-secret-123", "")]));
    assert!(out.contains("Vendor:BASALT"), "{out}");
    // Mutual: the target proves it knows its own secret.
    let q = "?target_user=basalt&target_password=target-secret-456";
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, &with("alice%alice-secret-123", q)]));
    assert!(out.contains("Vendor:BASALT"), "{out}");
    // A wrong initiator secret, no credentials at all, a wrong user: refused.
    for url in [
        with("alice%wrong-secret-123", ""),
        with("mallory%alice-secret-123", ""),
        format!("iscsi://127.0.0.1:{}/{}/0", d.iscsi_port, d.iqn()),
    ] {
        let o = run("iscsi-inq", &["-i", INI, &url]);
        assert!(!o.status.success(), "{url} logged in");
        assert!(String::from_utf8_lossy(&o.stderr).contains("Authentication failure"), "{o:?}");
    }
    // The initiator refuses a target that answers mutual CHAP wrongly.
    let q = "?target_user=basalt&target_password=not-the-target-secret";
    let o = run("iscsi-inq", &["-i", INI, &with("alice%alice-secret-123", q)]);
    assert!(!o.status.success());
    let log = d.log_text();
    assert_eq!(log.matches("CHAP response wrong").count(), 2, "{log}");
}
