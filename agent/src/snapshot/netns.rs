//! Network namespaces of the host, for snapshot scope `all`, and the container or pod a process
//! belongs to.
//!
//! A namespace is found through its processes: `/proc/PID/ns/net` of every pid, grouped by the
//! namespace's inode, with the lowest pid standing for the group. Its socket tables are then
//! `/proc/PID/net/*` of that pid, and its interfaces are read from a thread that entered it with
//! `setns`. A namespace no process is in (one kept only by a bind mount, like `ip netns add`
//! before anything runs there) holds no socket a process owns, so it has nothing to report.
//!
//! Names: the bind mounts under `/run/netns` (iproute2) and `/run/docker/netns` name the
//! namespaces they pin; any other is named as the kernel shows it, `net:[INODE]`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where named namespaces are pinned.
const NAME_DIRS: [&str; 2] = ["/run/netns", "/run/docker/netns"];

/// One network namespace as seen from the proc root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u64,
    /// Lowest pid in it.
    pub pid: u32,
    /// A few more pids in it, in order, in case `pid` exits before its tables are read.
    pub others: Vec<u32>,
    /// `ip netns` or docker name when pinned there, else `net:[INODE]`.
    pub name: String,
}

/// The namespace inode of a `/proc/PID/ns/net` (or `/proc/self/ns/net`) link.
pub fn inode_of(link: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(link)?.ino())
}

/// Every network namespace some process is in, by inode. Processes that exit meanwhile, or whose
/// namespace cannot be read (no privilege), are skipped.
pub fn list(proc_root: &Path) -> io::Result<Vec<Namespace>> {
    /// Pids kept per namespace: the lowest, and a few to fall back on.
    const KEPT: usize = 4;
    let mut by_inode: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir(proc_root)?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(inode) = inode_of(&entry.path().join("ns/net")) else {
            continue;
        };
        let pids = by_inode.entry(inode).or_default();
        pids.push(pid);
        if pids.len() > 2 * KEPT {
            pids.sort_unstable();
            pids.truncate(KEPT);
        }
    }
    let names = pinned_names();
    Ok(by_inode
        .into_iter()
        .map(|(inode, mut pids)| {
            pids.sort_unstable();
            pids.truncate(KEPT);
            Namespace {
                inode,
                pid: pids[0],
                others: pids[1..].to_vec(),
                name: names
                    .get(&inode)
                    .cloned()
                    .unwrap_or_else(|| format!("net:[{inode}]")),
            }
        })
        .collect())
}

/// Inode → name of every namespace pinned under [`NAME_DIRS`].
fn pinned_names() -> BTreeMap<u64, String> {
    let mut names = BTreeMap::new();
    for dir in NAME_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let (Ok(meta), Some(name)) = (
                std::fs::metadata(entry.path()),
                entry.file_name().to_str().map(str::to_string),
            ) {
                names.entry(meta.ino()).or_insert(name);
            }
        }
    }
    names
}

/// Runs `f` on a thread that has entered the network namespace `ns` (an open
/// `/proc/PID/ns/net`). Sockets `f` creates stay in that namespace; the calling thread's own
/// namespace is untouched. Needs CAP_SYS_ADMIN.
pub fn run_in<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
    })
}

/// `/proc/PID/ns/net`, opened, provided PID is still in the namespace `inode` (a pid reused since
/// the namespaces were listed would lead into another one).
pub fn open_checked(proc_root: &Path, pid: u32, inode: u64) -> io::Result<File> {
    let file = File::open(proc_root.join(pid.to_string()).join("ns/net"))?;
    if file.metadata()?.ino() != inode {
        return Err(io::Error::other(format!(
            "pid {pid} left network namespace {inode}"
        )));
    }
    Ok(file)
}

/// The `/proc/PID/net` directory: the socket tables of PID's network namespace.
pub fn net_dir(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("net")
}

/// The container or pod that owns a process, from the paths of `/proc/PID/cgroup`; empty when
/// none can be told. Forms: `docker:ID12`, `containerd:ID12`, `crio:ID12`, `podman:ID12`,
/// `lxc:NAME`, and `pod:UID/…` in front of the container for Kubernetes.
pub fn container_of(cgroup: &str) -> String {
    let mut pod = None;
    let mut container = None;
    for line in cgroup.lines() {
        // hierarchy-ID:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for part in path.split('/') {
            let part = part.strip_suffix(".scope").unwrap_or(part);
            let part = part.strip_suffix(".slice").unwrap_or(part);
            if let Some(uid) = pod_uid(part) {
                pod.get_or_insert(uid);
            } else if let Some(c) = runtime_container(part) {
                container.get_or_insert(c);
            } else if let Some(name) = part.strip_prefix("lxc.payload.") {
                container.get_or_insert(format!("lxc:{name}"));
            }
        }
        if container.is_none()
            && let Some(name) = path.strip_prefix("/lxc/")
        {
            let name = name.split('/').next().unwrap_or_default();
            if !name.is_empty() {
                container = Some(format!("lxc:{name}"));
            }
        }
    }
    match (pod, container) {
        (Some(pod), Some(c)) => format!("pod:{pod}/{c}"),
        (Some(pod), None) => format!("pod:{pod}"),
        (None, Some(c)) => c,
        (None, None) => String::new(),
    }
}

/// `pod<UID>` as cgroupfs writes it, or `kubepods-besteffort-pod<UID_WITH_UNDERSCORES>` as the
/// systemd driver does.
fn pod_uid(part: &str) -> Option<String> {
    let uid = part.rsplit_once("-pod").map_or_else(
        || part.strip_prefix("pod"),
        |(head, uid)| head.starts_with("kubepods").then_some(uid),
    )?;
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(uid)
}

/// A 64-hex container id, bare (`/docker/ID`, cgroupfs) or behind a runtime prefix
/// (`docker-ID.scope`, systemd), shortened to 12 characters as `docker ps` shows it.
fn runtime_container(part: &str) -> Option<String> {
    let (runtime, id) = match part.rsplit_once('-') {
        Some((prefix, id)) => (
            match prefix {
                "docker" => "docker",
                "cri-containerd" => "containerd",
                "crio" => "crio",
                "libpod" => "podman",
                _ => return None,
            },
            id,
        ),
        None => ("container", part),
    };
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("{runtime}:{}", &id[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_and_pods_are_told_from_cgroup_paths() {
        let id = "4f1c2e9a7b3d5e6f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f";
        // Docker with the systemd cgroup driver (cgroup v2), and with cgroupfs (v1).
        assert_eq!(
            container_of(&format!("0::/system.slice/docker-{id}.scope\n")),
            "docker:4f1c2e9a7b3d"
        );
        assert_eq!(
            container_of(&format!("12:memory:/docker/{id}\n11:cpu:/docker/{id}\n")),
            "container:4f1c2e9a7b3d"
        );
        // Kubernetes, systemd driver, containerd.
        assert_eq!(
            container_of(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3d6e0c1a_2b4f_4c8d_9e0f_1a2b3c4d5e6f.slice/cri-containerd-{id}.scope\n"
            )),
            "pod:3d6e0c1a-2b4f-4c8d-9e0f-1a2b3c4d5e6f/containerd:4f1c2e9a7b3d"
        );
        // Kubernetes, cgroupfs driver.
        assert_eq!(
            container_of(&format!(
                "0::/kubepods/besteffort/pod3d6e0c1a-2b4f-4c8d-9e0f-1a2b3c4d5e6f/{id}\n"
            )),
            "pod:3d6e0c1a-2b4f-4c8d-9e0f-1a2b3c4d5e6f/container:4f1c2e9a7b3d"
        );
        assert_eq!(
            container_of(&format!("0::/machine.slice/libpod-{id}.scope/container\n")),
            "podman:4f1c2e9a7b3d"
        );
        assert_eq!(
            container_of("0::/lxc.payload.web1/init.scope\n"),
            "lxc:web1"
        );
        assert_eq!(container_of("4:cpu:/lxc/db2/sub\n"), "lxc:db2");
        // Plain host processes and garbage.
        assert_eq!(container_of("0::/system.slice/nginx.service\n"), "");
        assert_eq!(
            container_of("0::/user.slice/user-0.slice/session-3.scope\n"),
            ""
        );
        assert_eq!(container_of("0::/docker-short.scope\nnonsense\n\n"), "");
        assert_eq!(container_of("0::/podnotauid\n"), "");
    }

    #[test]
    fn this_process_is_in_a_listed_namespace() {
        let own = inode_of(Path::new("/proc/self/ns/net")).unwrap();
        let spaces = list(Path::new("/proc")).unwrap();
        let me = std::process::id();
        let ours = spaces.iter().find(|n| n.inode == own).unwrap();
        assert!(ours.pid <= me);
        assert!(ours.others.iter().all(|p| *p > ours.pid));
        assert!(ours.name == format!("net:[{own}]") || !ours.name.starts_with("net:["));
    }
}
