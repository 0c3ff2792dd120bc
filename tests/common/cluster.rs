//! A local Redis Cluster for the tests: six `redis-server --cluster-enabled yes` on free
//! ports, joined by `redis-cli --cluster create … --cluster-replicas 1` into three masters
//! with a replica each. A node that stops answering for `NODE_TIMEOUT_MS` is failed over
//! to its replica, so a failover takes a second or two, not the default fifteen.

use super::{free_port, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `cluster-node-timeout`: how long a master may be silent before its replica takes over.
const NODE_TIMEOUT_MS: &str = "1000";

pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    procs: Mutex<Vec<Proc>>,
}

impl RedisCluster {
    /// Start the six nodes under `dir`, join them, and wait until the cluster is `ok`.
    pub fn start(dir: &Path) -> RedisCluster {
        let dir = dir.join("cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let procs = ports.iter().map(|p| spawn_node(&dir, *p)).collect();
        let c = RedisCluster {
            ports,
            dir,
            procs: Mutex::new(procs),
        };
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is missing: run `make test` or scripts/stack.sh install");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_ok(Duration::from_secs(30));
        c
    }

    /// `REDIS_URL` for the service: every node as a seed.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        let procs = self.procs.lock().unwrap();
        self.ports
            .iter()
            .copied()
            .filter(|p| procs.iter().any(|x| x.name == node_name(*p)))
            .collect()
    }

    /// Wait until every running node says `cluster_state:ok` and they agree on the
    /// masters, each of which has a known owner for every slot.
    pub fn wait_ok(&self, within: Duration) {
        let start = Instant::now();
        loop {
            let live = self.live_ports();
            let ok = live
                .iter()
                .all(|p| cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok && self.masters().len() == 3 {
                return;
            }
            assert!(
                start.elapsed() < within,
                "the cluster is not ok after {within:?}: {}",
                live.iter()
                    .map(|p| cli(*p, &["CLUSTER", "INFO"]))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The masters serving slots, by port, as a running node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let Some(p) = self.live_ports().first().copied() else {
            return Vec::new();
        };
        let mut masters: Vec<u16> = cli(p, &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.split(' ').count() > 8)
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?;
                addr.split(['@', ':']).nth(1)?.parse().ok()
            })
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The port of the master that serves `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        self.serving(key)
            .unwrap_or_else(|| panic!("no master serves {key}"))
    }

    /// Kill (SIGKILL) the master of `key`'s slot and wait until its replica serves the
    /// slot and the cluster is `ok` again; the new master's port.
    pub fn fail_over(&self, key: &str, within: Duration) -> u16 {
        let victim = self.master_of(key);
        self.kill(victim);
        let start = Instant::now();
        loop {
            match self.serving(key) {
                Some(p) if p != victim => {
                    self.wait_ok(within);
                    return p;
                }
                _ => assert!(
                    start.elapsed() < within,
                    "no replica took over {key} from {victim} within {within:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The master serving `key`'s slot, as a running node sees it (none while its master
    /// is failing and no replica took over yet).
    fn serving(&self, key: &str) -> Option<u16> {
        let p = self.live_ports()[0];
        let slot: u16 = cli(p, &["CLUSTER", "KEYSLOT", key]).trim().parse().unwrap();
        let nodes = cli(p, &["CLUSTER", "NODES"]);
        for l in nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
        {
            let fields: Vec<&str> = l.split(' ').collect();
            let serves = fields.iter().skip(8).any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                match (a.parse::<u16>(), b.parse::<u16>()) {
                    (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                return fields[1].split(['@', ':']).nth(1)?.parse().ok();
            }
        }
        None
    }

    /// Run a command on the node that serves `key` (`redis-cli -c` follows redirects).
    pub fn query(&self, key: &str, args: &[&str]) -> String {
        cli(self.master_of(key), args)
    }

    /// SIGKILL the node on `port`.
    pub fn kill(&self, port: u16) {
        let mut procs = self.procs.lock().unwrap();
        if let Some(i) = procs.iter().position(|p| p.name == node_name(port)) {
            procs.remove(i).kill();
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn node_name(port: u16) -> String {
    format!("redis-cluster-{port}")
}

fn spawn_node(dir: &Path, port: u16) -> Proc {
    let d = dir.join(port.to_string());
    std::fs::create_dir_all(&d).unwrap();
    let mut p = Proc::spawn(
        &node_name(port),
        dir,
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cluster-enabled", "yes"])
            // The bus port on a free port of its own, not the default port + 10000, which
            // may be taken (or in the ephemeral range).
            .args(["--cluster-port", &free_port().to_string()])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
            // A replica may take over however long it was cut off (loopback: never long).
            .args(["--cluster-replica-validity-factor", "0"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&d),
    );
    p.wait_port(port, Duration::from_secs(10));
    p
}

/// `redis-cli -p PORT ARGS…`'s output (empty when the node does not answer).
pub fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "-c"])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
