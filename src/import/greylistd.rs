//! greylistd's `states` file with its `triplets` file beside it (DESIGN §13).
//!
//! greylistd (0.9) saves two files on its update interval and when it stops:
//! - `states`: INI sections `[white]`, `[grey]`, `[black]` (and `[statistics]`) of
//!   `KEY = LAST FIRST COUNT`, where KEY is Python's `hash()` of the triplet text;
//! - `triplets`: `KEY = TEXT`, the text greylistd was given, lower-cased: `IP SENDER
//!   RECIPIENT` as Exim's ACL sends it (`IP RECIPIENT` for the null sender, whose empty
//!   word vanishes; just `IP` for a host added with `greylist add` or `singleupdate`).
//!
//! The key is a hash, so only the join tells what a state was about. The states (the set
//! greylistd itself holds in memory) are loaded into a map; the triplets file, which holds
//! every text ever saved, streams against it. `[white]` entries become passed triplets (a
//! white entry's first seen is when it turned white: greylistd resets it), `[grey]` ones
//! greylisted triplets, a lone white `IP` a client auto-whitelist entry. `[black]` has no
//! Greyhound equivalent. A triplet whose state is gone had expired; a state without a
//! triplet (`savetriplets = false`) cannot be recovered ([`Skip::Hashed`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::{
    parse_client, read_line_bounded, ClientItem, Counting, ImportError, ImportReader, Item,
    ReadOptions, ReadResult, Skip, TripletItem,
};

/// Which of greylistd's lists a state is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum List {
    White,
    Grey,
    Black,
}

/// One state: list, last seen, first seen, count.
#[derive(Debug, Clone, Copy)]
struct State {
    list: List,
    last: u64,
    first: u64,
    count: u64,
}

/// Streams greylistd's triplets joined with their states.
#[derive(Debug)]
pub struct Reader {
    triplets_path: PathBuf,
    input: BufReader<Counting<File>>,
    states_size: u64,
    total: u64,
    states: HashMap<i64, State>,
    /// States that had no triplet, sorted, handed out once the triplets file is done.
    orphans: Option<std::vec::IntoIter<(i64, State)>>,
    /// Skips found while loading `states`, handed out first.
    early: std::vec::IntoIter<ReadResult>,
    line: u64,
    buf: Vec<u8>,
    failure: Option<ImportError>,
}

/// Loads `states` and opens the `triplets` file beside it.
pub fn read(path: &Path, _opts: &ReadOptions) -> Result<Reader, ImportError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ImportError::Io { path: p, source }
    };
    let file = File::open(path).map_err(io(path))?;
    let states_size = file.metadata().map_err(io(path))?.len();
    let mut input = BufReader::new(file);
    let mut states = HashMap::new();
    let mut early = Vec::new();
    let mut section: Option<Option<List>> = None;
    let mut buf = Vec::new();
    let mut line = 0u64;
    let mut sections = 0;
    loop {
        let whole =
            read_line_bounded(&mut input, &mut buf).map_err(|source| ImportError::IoAt {
                path: path.to_path_buf(),
                line: line + 1,
                source,
            })?;
        let Some(whole) = whole else { break };
        line += 1;
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if let Some(name) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            sections += 1;
            section = Some(match name.trim() {
                "white" => Some(List::White),
                "grey" => Some(List::Grey),
                "black" => Some(List::Black),
                _ => None,
            });
            continue;
        }
        let Some(list) = section else {
            return Err(ImportError::Format {
                path: path.to_path_buf(),
                line,
                message: "not a greylistd states file (a line before any [section])".into(),
            });
        };
        let Some(list) = list else { continue };
        let parsed = whole.then(|| parse_state(text, list)).flatten();
        match parsed {
            Some((key, state)) => {
                states.insert(key, state);
            }
            None => early.push(Err((
                Skip::Unparsable,
                format!("states line {line}: {text:?}"),
            ))),
        }
    }
    if sections == 0 {
        return Err(ImportError::Format {
            path: path.to_path_buf(),
            line,
            message: "not a greylistd states file (no [white], [grey] or [black] section)".into(),
        });
    }
    let triplets_path = path.with_file_name("triplets");
    let file = File::open(&triplets_path).map_err(|source| ImportError::Io {
        path: triplets_path.clone(),
        source: std::io::Error::new(
            source.kind(),
            format!("{source} (greylistd's triplets file must be beside its states file)"),
        ),
    })?;
    let total = states_size + file.metadata().map_err(io(&triplets_path))?.len();
    Ok(Reader {
        triplets_path,
        input: BufReader::with_capacity(
            64 * 1024,
            Counting {
                inner: file,
                count: 0,
            },
        ),
        states_size,
        total,
        states,
        orphans: None,
        early: early.into_iter(),
        line: 0,
        buf: Vec::new(),
        failure: None,
    })
}

/// `KEY = LAST FIRST COUNT`.
fn parse_state(text: &str, list: List) -> Option<(i64, State)> {
    let (key, value) = text.split_once('=')?;
    let key = key.trim().parse().ok()?;
    let mut v = value.split_whitespace().map(|n| n.parse::<u64>());
    let (last, first, count) = (v.next()?.ok()?, v.next()?.ok()?, v.next()?.ok()?);
    v.next().is_none().then_some((
        key,
        State {
            list,
            last,
            first,
            count,
        },
    ))
}

/// One `triplets` line joined with its state.
fn joined(text: &str, state: State) -> Result<Item, (Skip, &'static str)> {
    let words = text.split_whitespace().collect::<Vec<_>>();
    let (ip, sender, recipient) = match words[..] {
        [ip] => {
            if state.list != List::White {
                return Err((Skip::NoEquivalent, "a host on the grey list"));
            }
            // `greylist add IP` or `singleupdate`: the host passes with any triplet.
            let client = parse_host(ip).ok_or((Skip::BadClient, "not an address"))?;
            return Ok(Item::Client(ClientItem {
                client,
                count: u32::try_from(state.count).unwrap_or(u32::MAX),
                last_seen: state.last,
            }));
        }
        [ip, recipient] => (ip, "", recipient),
        [ip, sender, recipient] => (ip, sender, recipient),
        _ => return Err((Skip::Unparsable, "not IP [SENDER] RECIPIENT")),
    };
    if state.list == List::Black {
        return Err((
            Skip::NoEquivalent,
            "greylistd's black list has no equivalent",
        ));
    }
    let client = parse_host(ip).ok_or((Skip::BadClient, "not an address"))?;
    let sender = if sender == "<>" { "" } else { sender };
    Ok(Item::Triplet(TripletItem {
        client,
        sender: sender.to_owned(),
        recipient: recipient.to_owned(),
        first_seen: state.first.min(state.last),
        last_seen: state.last,
        passed: state.list == List::White,
    }))
}

/// An address, or a network as Exim's `${mask:…}` writes it (`192.0.2.0/24`).
fn parse_host(s: &str) -> Option<std::net::IpAddr> {
    parse_client(s.split_once('/').map_or(s, |(a, _)| a))
}

impl Iterator for Reader {
    type Item = ReadResult;

    fn next(&mut self) -> Option<ReadResult> {
        if let Some(r) = self.early.next() {
            return Some(r);
        }
        loop {
            if let Some(orphans) = &mut self.orphans {
                let (key, state) = orphans.next()?;
                return Some(Err((
                    Skip::Hashed,
                    format!(
                        "state {key} ({:?} list) has no line in {}: its triplet cannot be recovered",
                        state.list,
                        self.triplets_path.display()
                    ),
                )));
            }
            let whole = match read_line_bounded(&mut self.input, &mut self.buf) {
                Ok(Some(whole)) => whole,
                Ok(None) => {
                    let mut rest = std::mem::take(&mut self.states)
                        .into_iter()
                        .collect::<Vec<_>>();
                    rest.sort_unstable_by_key(|(k, _)| *k);
                    self.orphans = Some(rest.into_iter());
                    continue;
                }
                Err(source) => {
                    let err = ImportError::IoAt {
                        path: self.triplets_path.clone(),
                        line: self.line + 1,
                        source,
                    };
                    let msg = err.to_string();
                    self.failure = Some(err);
                    self.orphans = Some(Vec::new().into_iter());
                    return Some(Err((Skip::Unparsable, msg)));
                }
            };
            self.line += 1;
            let line = self.line;
            let text = String::from_utf8_lossy(&self.buf);
            let Some((key, triplet)) = text
                .split_once(" = ")
                .and_then(|(k, t)| Some((k.trim().parse::<i64>().ok()?, t.trim())))
                .filter(|_| whole)
            else {
                if text.trim().is_empty() {
                    continue;
                }
                return Some(Err((
                    Skip::Unparsable,
                    format!("triplets line {line}: {text:?}"),
                )));
            };
            let Some(state) = self.states.remove(&key) else {
                return Some(Err((
                    Skip::Expired,
                    format!("triplets line {line}: {triplet:?} has no state left (expired)"),
                )));
            };
            return Some(joined(triplet, state).map_err(|(skip, why)| {
                (skip, format!("triplets line {line}: {why}: {triplet:?}"))
            }));
        }
    }
}

impl ImportReader for Reader {
    fn bytes_read(&self) -> u64 {
        self.states_size + self.input.get_ref().count
    }
    fn total_bytes(&self) -> u64 {
        self.total
    }
    fn failure(&self) -> Option<&ImportError> {
        self.failure.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import/greylistd")
    }

    fn all(states: &Path) -> Vec<ReadResult> {
        let mut r = read(states, &ReadOptions::default()).expect("open");
        let v = r.by_ref().collect();
        assert!(r.failure().is_none());
        assert_eq!(r.bytes_read(), r.total_bytes());
        v
    }

    #[test]
    fn real_greylistd_files() {
        let v = all(&fixture_dir().join("states"));
        let t = |ip: &str, s: &str, r: &str, first, last, passed| {
            Ok(Item::Triplet(TripletItem {
                client: ip.parse().unwrap(),
                sender: s.into(),
                recipient: r.into(),
                first_seen: first,
                last_seen: last,
                passed,
            }))
        };
        assert_eq!(v.len(), 4, "{v:?}");
        assert_eq!(
            v[0],
            t(
                "192.0.2.10",
                "alice@example.org",
                "bob@example.net",
                1796184463,
                1796184463,
                true
            )
        );
        assert_eq!(
            v[1],
            t(
                "198.51.100.7",
                "",
                "bounces@example.net",
                1796184461,
                1796184461,
                false
            )
        );
        assert_eq!(v[2].as_ref().unwrap_err().0, Skip::NoEquivalent);
        assert_eq!(
            v[3],
            Ok(Item::Client(ClientItem {
                client: "2001:db8::5".parse().unwrap(),
                count: 1,
                last_seen: 1796184461,
            }))
        );
    }

    #[test]
    fn states_without_triplets_and_triplets_without_states() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("states"),
            "[white]\n5 = 20 10 3\n-7 = 30 10 1\nbroken line\n[grey]\n9 = 1 2\n[statistics]\nwhite = 2\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("triplets"),
            "5 = 192.0.2.0/24 <> b@example.net\n11 = 192.0.2.1 a@example.org b@example.net\n\
             x = y\n",
        )
        .unwrap();
        let v = all(&dir.path().join("states"));
        let skips = v
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.0))
            .collect::<Vec<_>>();
        use Skip::*;
        // Two unparsable states, then the join: expired triplet, unparsable line, then
        // the state left without text.
        assert_eq!(skips, [Unparsable, Unparsable, Expired, Unparsable, Hashed]);
        assert!(matches!(&v[2], Ok(Item::Triplet(t)) if t.sender.is_empty()
            && t.client == "192.0.2.0".parse::<std::net::IpAddr>().unwrap()
            && t.first_seen == 10 && t.last_seen == 20 && t.passed));
    }

    #[test]
    fn missing_triplets_file_and_wrong_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("states"), "[white]\n").unwrap();
        let err = read(&dir.path().join("states"), &ReadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("triplets"), "{err}");
        std::fs::write(dir.path().join("states"), "hello\n").unwrap();
        let err = read(&dir.path().join("states"), &ReadOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains(":1: not a greylistd states file"),
            "{err}"
        );
    }
}
