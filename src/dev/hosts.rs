//! The hosts file: each `kips connect` run adds one marked block and removes exactly that
//! block when it ends, so the file comes back byte for byte, also when several runs overlap.
//!
//! A block:
//!
//! ```text
//! # kips connect dev/deployment/api begin id=<id> pid=<pid>
//! 127.77.0.1<TAB>postgres.data.svc
//! # 127.77.0.2<TAB>10.0.0.5 (an IP address: reach it at 127.77.0.2)
//! # kips connect dev/deployment/api end id=<id>
//! ```
//!
//! When the file did not end with a newline, the run adds one before its block and says so
//! with `eol-added` on the begin line; whoever removes the last block also removes that
//! newline. Edits happen under an exclusive lock on the hosts file itself and are written in
//! place (the inode stays: `/etc/hosts` is often a bind mount that cannot be replaced).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::laptop::HostsEntry;

const MARK: &str = "# kips connect ";
const EOL_ADDED: &str = "eol-added";

/// One kips block found in a hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub label: String,
    pub id: String,
    pub pid: u32,
    pub eol_added: bool,
    /// Loopback addresses its lines hold (active or reserved in a comment).
    pub addresses: Vec<Ipv4Addr>,
    /// Byte range from the begin line's start to the end line's end.
    start: usize,
    end: usize,
    begin_line_end: usize,
}

/// Lines with their byte offsets (each including its `\n`, if any).
fn lines(content: &str) -> impl Iterator<Item = (usize, &str)> {
    content.split_inclusive('\n').scan(0, |offset, line| {
        let start = *offset;
        *offset += line.len();
        Some((start, line))
    })
}

struct Begin<'a> {
    label: &'a str,
    id: &'a str,
    pid: u32,
    eol_added: bool,
}

fn parse_begin(line: &str) -> Option<Begin<'_>> {
    let rest = line.trim_end_matches(['\n', '\r']).strip_prefix(MARK)?;
    let mut words = rest.split(' ');
    let label = words.next()?;
    if words.next()? != "begin" {
        return None;
    }
    let id = words.next()?.strip_prefix("id=")?;
    let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
    let eol_added = match words.next() {
        None => false,
        Some(EOL_ADDED) => true,
        Some(_) => return None,
    };
    Some(Begin {
        label,
        id,
        pid,
        eol_added,
    })
}

fn is_end(line: &str, label: &str, id: &str) -> bool {
    line.trim_end_matches(['\n', '\r']) == end_line(label, id)
}

fn begin_line(label: &str, id: &str, pid: u32, eol_added: bool) -> String {
    let flag = if eol_added { " eol-added" } else { "" };
    format!("{MARK}{label} begin id={id} pid={pid}{flag}")
}

fn end_line(label: &str, id: &str) -> String {
    format!("{MARK}{label} end id={id}")
}

/// The first IPv4 address of a block line (`127.77.0.1 name` or `# 127.77.0.1 ...`).
fn line_address(line: &str) -> Option<Ipv4Addr> {
    let text = line.trim_start_matches('#').trim_start();
    text.split_whitespace().next()?.parse().ok()
}

/// Every complete kips block of `content`.
pub fn blocks(content: &str) -> Vec<Block> {
    let all: Vec<(usize, &str)> = lines(content).collect();
    let mut found = Vec::new();
    let mut index = 0;
    while index < all.len() {
        let (start, line) = all[index];
        index += 1;
        let Some(begin) = parse_begin(line) else {
            continue;
        };
        let mut addresses = Vec::new();
        for (probe, &(offset, inner)) in all.iter().enumerate().skip(index) {
            if is_end(inner, begin.label, begin.id) {
                found.push(Block {
                    label: begin.label.to_owned(),
                    id: begin.id.to_owned(),
                    pid: begin.pid,
                    eol_added: begin.eol_added,
                    addresses,
                    start,
                    end: offset + inner.len(),
                    begin_line_end: start + line.len(),
                });
                index = probe + 1;
                break;
            }
            addresses.extend(line_address(inner));
        }
    }
    found
}

/// Loopback addresses that blocks of other runs hold.
pub fn taken_addresses(content: &str) -> BTreeSet<Ipv4Addr> {
    blocks(content)
        .into_iter()
        .flat_map(|b| b.addresses)
        .collect()
}

/// `content` with a block for `entries` appended.
pub fn add_block(content: &str, label: &str, id: &str, pid: u32, entries: &[HostsEntry]) -> String {
    let eol_added = !content.is_empty() && !content.ends_with('\n');
    let mut out = String::with_capacity(content.len() + 128);
    out.push_str(content);
    if eol_added {
        out.push('\n');
    }
    out.push_str(&begin_line(label, id, pid, eol_added));
    out.push('\n');
    for entry in entries {
        if entry.named {
            out.push_str(&format!("{}\t{}\n", entry.address, entry.host));
        } else {
            out.push_str(&format!(
                "# {}\t{} (an IP address: reach it at {})\n",
                entry.address, entry.host, entry.address
            ));
        }
    }
    out.push_str(&end_line(label, id));
    out.push('\n');
    out
}

/// `content` without the block `id`; `None` when there is no such block.
pub fn remove_block(content: &str, id: &str) -> Option<String> {
    let block = blocks(content).into_iter().find(|b| b.id == id)?;
    let before = &content[..block.start];
    let after = &content[block.end..];
    if !block.eol_added {
        return Some(format!("{before}{after}"));
    }
    if after.is_empty() {
        // The newline this run added goes with it.
        return Some(before.strip_suffix('\n').unwrap_or(before).to_owned());
    }
    // Another block follows: it inherits the added newline, to remove it when it goes.
    let next = blocks(after).into_iter().find(|b| b.start == 0);
    match next {
        Some(next) if !next.eol_added => {
            let line = begin_line(&next.label, &next.id, next.pid, true);
            let rest = &after[next.begin_line_end..];
            Some(format!("{before}{line}\n{rest}"))
        }
        // Someone wrote after the block: the file changed anyway; keep their text intact.
        _ => Some(format!("{before}{after}")),
    }
}

/// True when a process with this pid exists (a block of a dead run is stale).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // Signal 0 checks existence; EPERM means it exists under another user.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A hosts file, edited under an exclusive lock on the file itself.
#[derive(Debug, Clone)]
pub struct HostsFile {
    pub path: PathBuf,
}

impl HostsFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Reads the file without a lock (for `--print`).
    pub fn read(&self) -> Result<String> {
        let bytes = std::fs::read(&self.path)
            .with_context(|| format!("reading the hosts file {}", self.path.display()))?;
        String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "the hosts file {} is not UTF-8 text; kips will not edit it",
                self.path.display()
            )
        })
    }

    /// Runs `edit` on the content under the lock and writes what it returns (when it
    /// differs) in place.
    pub fn edit<T>(&self, edit: impl FnOnce(&str) -> Result<(String, T)>) -> Result<T> {
        let mut file = open_for_edit(&self.path)?;
        file.lock()
            .with_context(|| format!("locking the hosts file {}", self.path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading the hosts file {}", self.path.display()))?;
        let content = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "the hosts file {} is not UTF-8 text; kips will not edit it",
                self.path.display()
            )
        })?;
        let (updated, value) = edit(&content)?;
        if updated != content {
            write_in_place(&mut file, updated.as_bytes())
                .with_context(|| format!("writing the hosts file {}", self.path.display()))?;
        }
        // The lock goes with the file handle.
        Ok(value)
    }
}

fn open_for_edit(path: &Path) -> Result<File> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok(file),
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "kips connect cannot edit the hosts file {} (permission denied): reverse entries need their host names there. Run it with sudo, or give a writable file with --hosts-file (and point your resolver at it)",
            path.display()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("the hosts file {} does not exist", path.display())
        }
        Err(error) => {
            Err(error).with_context(|| format!("opening the hosts file {}", path.display()))
        }
    }
}

fn write_in_place(file: &mut File, content: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(content)?;
    file.set_len(content.len() as u64)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries() -> Vec<HostsEntry> {
        vec![
            HostsEntry {
                address: "127.77.0.1".parse().unwrap(),
                host: "postgres.data.svc".into(),
                named: true,
            },
            HostsEntry {
                address: "127.77.0.2".parse().unwrap(),
                host: "10.0.0.5".into(),
                named: false,
            },
        ]
    }

    const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n";

    #[test]
    fn a_block_is_added_and_removed_exactly() {
        let added = add_block(HOSTS, "dev/deployment/api", "a1", 42, &entries());
        assert_eq!(
            added,
            format!(
                "{HOSTS}# kips connect dev/deployment/api begin id=a1 pid=42\n127.77.0.1\tpostgres.data.svc\n# 127.77.0.2\t10.0.0.5 (an IP address: reach it at 127.77.0.2)\n# kips connect dev/deployment/api end id=a1\n"
            )
        );
        let found = blocks(&added);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pid, 42);
        assert_eq!(
            taken_addresses(&added),
            BTreeSet::from(["127.77.0.1".parse().unwrap(), "127.77.0.2".parse().unwrap()])
        );
        assert_eq!(remove_block(&added, "a1").unwrap(), HOSTS);
        assert_eq!(remove_block(HOSTS, "a1"), None);
    }

    #[test]
    fn a_missing_final_newline_comes_back_in_every_order() {
        let original = "127.0.0.1 localhost";
        let a = add_block(original, "ns/deployment/a", "a", 1, &entries());
        assert!(blocks(&a)[0].eol_added);
        let ab = add_block(&a, "ns/deployment/b", "b", 2, &entries());
        assert!(!blocks(&ab)[1].eol_added);
        // a first, then b
        let b_only = remove_block(&ab, "a").unwrap();
        assert!(blocks(&b_only)[0].eol_added, "b inherits the added newline");
        assert_eq!(remove_block(&b_only, "b").unwrap(), original);
        // b first, then a
        let a_only = remove_block(&ab, "b").unwrap();
        assert_eq!(a_only, a);
        assert_eq!(remove_block(&a_only, "a").unwrap(), original);
    }

    #[test]
    fn empty_files_and_crlf_files_come_back() {
        for original in ["", "127.0.0.1 localhost\r\n", "\n\n# comment only"] {
            let added = add_block(original, "n/deployment/w", "x", 7, &entries());
            assert_eq!(remove_block(&added, "x").unwrap(), original);
        }
    }

    #[test]
    fn text_written_after_a_block_survives_its_removal() {
        let added = add_block("a", "n/deployment/w", "x", 7, &entries());
        let edited = format!("{added}10.1.1.1 mine\n");
        assert_eq!(remove_block(&edited, "x").unwrap(), "a\n10.1.1.1 mine\n");
    }

    #[test]
    fn lookalike_lines_are_not_blocks() {
        let text = "# kips connect x begin id=1 pid=zz\n# kips connect x end id=1\n# kips connect y begin id=2 pid=3\nno end\n";
        assert!(blocks(text).is_empty());
    }

    #[test]
    fn process_liveness() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
    }

    proptest! {
        #[test]
        fn overlapping_runs_restore_any_file(original in "[ -~\\n\\r\\t]{0,80}", order in Just(vec![0usize, 1, 2]).prop_shuffle()) {
            // Skip contents that already look like kips blocks.
            prop_assume!(!original.contains("# kips connect"));
            let mut content = original.clone();
            for id in 0..3 {
                content = add_block(&content, "ns/deployment/w", &format!("r{id}"), id as u32 + 1, &entries());
            }
            for id in order {
                content = remove_block(&content, &format!("r{id}")).unwrap();
            }
            prop_assert_eq!(content, original);
        }
    }
}
