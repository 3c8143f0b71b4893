//! Network namespaces for multi-host tests: node k in a namespace of its
//! own at 10.SUBNET.0.(k+1), joined by a veth pair to one bridge in a
//! "switch" namespace, so cutting node k's switch port partitions it.
//! Traffic stays inside the namespaces; they are deleted on drop, also
//! when the test fails.

use std::process::Command;

pub struct Net {
    sw: String,
    pub nodes: Vec<String>,
    subnet: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Net {
    /// `n` namespaces named after `tag` and this process (tests running at
    /// once pass distinct tags and subnets).
    pub fn new(tag: &str, subnet: u8, n: usize) -> Net {
        let id = format!("{tag}{}", std::process::id());
        let net = Net { sw: format!("{id}sw"), nodes: (0..n).map(|k| format!("{id}n{k}")).collect(), subnet };
        ip(&["netns", "add", &net.sw]);
        ip(&["-n", &net.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.sw, "link", "set", "br0", "up"]);
        for (k, ns) in net.nodes.iter().enumerate() {
            let port = format!("sw{k}");
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &net.sw]);
            ip(&["-n", &net.sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &net.sw, "link", "set", &port, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{}/24", net.addr(k)), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// Node k's address.
    pub fn addr(&self, k: usize) -> String {
        format!("10.{}.0.{}", self.subnet, k + 1)
    }

    /// Brings node k's switch port up or down.
    pub fn link(&self, k: usize, up: bool) {
        ip(&["-n", &self.sw, "link", "set", &format!("sw{k}"), if up { "up" } else { "down" }]);
    }

    /// The command prefix that runs a program in node k's namespace.
    pub fn wrap(&self, k: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.nodes[k].clone()]
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.sw)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
