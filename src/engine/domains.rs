//! Per-recipient-domain policy (`domain-policy` files, DESIGN §11): a domain can be left out of
//! greylisting (`off`), have its own `delay`, a shorter `retry-window` or `whitelist-ttl`, or be
//! run dry (`dry-run`).
//!
//! Lines are `<domain> <setting>...`; `example.com` is that domain only, `.example.com` every
//! subdomain of it (not itself), and the most specific entry wins: the exact name, then the
//! longest listed suffix. Names compare without regard to case; `#` starts a comment.
//!
//! Records are stored and expired by the global settings (the table does not know a record's
//! domain), so a domain's windows may only be shorter than the global ones: a shorter window is
//! applied when a record is judged (an older record counts as unknown), a longer one could never
//! be honoured, and is refused at load.
//!
//! A lookup is one hash probe for the exact name and one per parent suffix, whatever the number of
//! entries; the files are loaded with the exemption lists (see [`super::exempt`]), all or nothing.

use ahash::{AHashMap, RandomState};

use super::exempt::{entries_of, ExemptError};
use super::policy::{format_duration, Policy, MAX_DURATION};

/// What a `domain-policy` entry says about a domain's requests. Small and `Copy`: it travels
/// from preparing to deciding in [`super::Keyed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DomainRule {
    /// `off`: answer PASS `domain-off` and record nothing.
    pub off: bool,
    /// `dry-run`: answer PASS `dry-run` where the answer would be DEFER.
    pub dry_run: bool,
    /// `delay=`: replaces the global delay.
    pub delay: Option<u32>,
    /// `retry-window=`: shorter than the global one.
    pub retry_window: Option<u32>,
    /// `whitelist-ttl=`: shorter than the global one.
    pub whitelist_ttl: Option<u32>,
}

impl DomainRule {
    /// The settings a request to this domain is judged by: `global` with this rule laid over it.
    pub fn over(&self, global: &Policy) -> Policy {
        Policy {
            delay: self.delay.unwrap_or(global.delay),
            retry_window: self.retry_window.unwrap_or(global.retry_window),
            whitelist_ttl: self.whitelist_ttl.unwrap_or(global.whitelist_ttl),
            dry_run: global.dry_run || self.dry_run,
            ..*global
        }
    }
}

/// The loaded `domain-policy` entries. Default = empty (every lookup misses).
///
/// Names are kept as their 64-bit hash under a key drawn at random per process, and rules as an
/// index into the few distinct rules: a lookup then touches the table's slot and no string, and
/// an entry costs less than half. Measured with `examples/domain_policy` at 1 M entries, names
/// stored → hashed: exact hit 310–336 → 179–223 ns, suffix hit 589–619 → 346–350 ns, resident
/// 101 → 46 MB. Two names of one hash (2⁻⁶⁴ for a given pair, not searchable without the key)
/// would be reported as listed twice at load, or one taken for the other.
#[derive(Debug)]
pub struct DomainPolicies {
    hasher: RandomState,
    exact: AHashMap<u64, u32>,
    /// `.example.com` entries, by the hash of the name without the leading dot.
    suffixes: AHashMap<u64, u32>,
    /// The distinct rules; entries index it.
    rules: Vec<DomainRule>,
}

impl Default for DomainPolicies {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            exact: AHashMap::default(),
            suffixes: AHashMap::default(),
            rules: Vec::new(),
        }
    }
}

impl DomainPolicies {
    /// Whether no entry is loaded.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// Number of entries loaded.
    pub fn len(&self) -> usize {
        self.exact.len() + self.suffixes.len()
    }

    /// The rule for `domain` (ASCII lower-case): the exact entry, else the longest listed
    /// suffix; `None` when no entry applies.
    pub fn lookup(&self, domain: &str) -> Option<DomainRule> {
        if let Some(&r) = self.exact.get(&self.hasher.hash_one(domain)) {
            return Some(self.rules[r as usize]);
        }
        if self.suffixes.is_empty() {
            return None;
        }
        // Parents from the longest: "a.b.c" tries "b.c", then "c".
        let mut rest = domain;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(&r) = self.suffixes.get(&self.hasher.hash_one(rest)) {
                return Some(self.rules[r as usize]);
            }
        }
        None
    }

    /// Adds the entries of one file's text, all or none. `global` is the configured policy, which
    /// a domain's windows may not exceed.
    pub fn add_text(
        &mut self,
        source_name: &str,
        text: &str,
        global: &Policy,
    ) -> Result<usize, ExemptError> {
        let mut parsed = Vec::new();
        for (line, entry) in entries_of(text) {
            let err = |message: String| ExemptError::Parse {
                source_name: source_name.to_owned(),
                line,
                message,
            };
            let (name, subdomains, rule) = parse_line(entry, global).map_err(err)?;
            let table = if subdomains {
                &self.suffixes
            } else {
                &self.exact
            };
            if table.contains_key(&self.hasher.hash_one(name.as_str())) {
                let shown = if subdomains { "." } else { "" };
                return Err(err(format!(
                    "\"{shown}{name}\" is listed twice (also in an earlier line or file)"
                )));
            }
            parsed.push((name, subdomains, rule, line));
        }
        // Duplicates inside this text, found after parsing so that nothing is half-added.
        let mut seen: AHashMap<(&str, bool), usize> = AHashMap::with_capacity(parsed.len());
        for (name, subdomains, _, line) in &parsed {
            if let Some(first) = seen.insert((name.as_str(), *subdomains), *line) {
                let shown = if *subdomains { "." } else { "" };
                return Err(ExemptError::Parse {
                    source_name: source_name.to_owned(),
                    line: *line,
                    message: format!("\"{shown}{name}\" is listed twice (also on line {first})"),
                });
            }
        }
        let n = parsed.len();
        self.exact.reserve(n);
        let mut index: AHashMap<DomainRule, u32> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (*r, i as u32))
            .collect();
        for (name, subdomains, rule, _) in parsed {
            let next = self.rules.len() as u32;
            let r = *index.entry(rule).or_insert_with(|| {
                self.rules.push(rule);
                next
            });
            let table = if subdomains {
                &mut self.suffixes
            } else {
                &mut self.exact
            };
            table.insert(self.hasher.hash_one(name.as_str()), r);
        }
        Ok(n)
    }

    /// Releases spare capacity once every file is in.
    pub(crate) fn frozen(mut self) -> Self {
        self.exact.shrink_to_fit();
        self.suffixes.shrink_to_fit();
        self
    }
}

/// One line: the (lower-case) name, whether it is a `.suffix`, and its rule.
fn parse_line(entry: &str, global: &Policy) -> Result<(String, bool, DomainRule), String> {
    let mut words = entry.split_ascii_whitespace();
    let first = words.next().unwrap_or("");
    let (subdomains, name) = match first.strip_prefix('.') {
        Some(n) => (true, n),
        None => (false, first),
    };
    check_domain(name).map_err(|reason| format!("invalid domain \"{first}\": {reason}"))?;
    let mut rule = DomainRule::default();
    let mut any = false;
    for word in words {
        any = true;
        let (setting, value) = match word.split_once('=') {
            Some((s, v)) => (s, Some(v)),
            None => (word, None),
        };
        let setting_lc = setting.to_ascii_lowercase();
        let dup = || format!("\"{setting}\" is given twice for \"{first}\"");
        match (setting_lc.as_str(), value) {
            ("off", None) => {
                if rule.off {
                    return Err(dup());
                }
                rule.off = true;
            }
            ("dry-run", None) => {
                if rule.dry_run {
                    return Err(dup());
                }
                rule.dry_run = true;
            }
            ("delay" | "retry-window" | "whitelist-ttl", Some(v)) => {
                let secs = crate::config::parse_duration(v)
                    .map_err(|e| format!("{setting_lc} of \"{first}\": {e}"))?;
                if secs > MAX_DURATION {
                    return Err(format!(
                        "{setting_lc} of \"{first}\" ({}) is longer than the maximum of 10 years",
                        format_duration(secs)
                    ));
                }
                let slot = match setting_lc.as_str() {
                    "delay" => &mut rule.delay,
                    "retry-window" => &mut rule.retry_window,
                    _ => &mut rule.whitelist_ttl,
                };
                if slot.is_some() {
                    return Err(dup());
                }
                *slot = Some(secs);
            }
            ("off" | "dry-run", Some(_)) => {
                return Err(format!("\"{setting}\" takes no value, got \"{word}\""));
            }
            ("delay" | "retry-window" | "whitelist-ttl", None) => {
                return Err(format!(
                    "\"{setting}\" needs a duration (\"{setting}=60s\")"
                ));
            }
            _ => {
                return Err(format!(
                    "unknown setting \"{word}\" (expected off, dry-run, delay=, retry-window=, \
                     whitelist-ttl=)"
                ));
            }
        }
    }
    if !any {
        return Err(format!(
            "\"{first}\" has no setting (off, dry-run, delay=, retry-window=, whitelist-ttl=)"
        ));
    }
    if rule.off
        && (rule.dry_run
            || rule.delay.is_some()
            || rule.retry_window.is_some()
            || rule.whitelist_ttl.is_some())
    {
        return Err(format!(
            "\"{first}\" is off and has other settings: an off domain is never greylisted"
        ));
    }
    check_windows(&rule, global)?;
    Ok((name.to_ascii_lowercase(), subdomains, rule))
}

/// A domain's windows are at most the global ones, and its delay fits its retry window.
fn check_windows(rule: &DomainRule, global: &Policy) -> Result<(), String> {
    let longer = [
        ("retry-window", rule.retry_window, global.retry_window),
        ("whitelist-ttl", rule.whitelist_ttl, global.whitelist_ttl),
    ];
    for (setting, own, global) in longer {
        if let Some(own) = own.filter(|&own| own > global) {
            return Err(format!(
                "{setting}={} is longer than the global {setting} ({}): records live by the \
                 global settings, so a domain's {setting} may only be shorter",
                format_duration(own),
                format_duration(global)
            ));
        }
    }
    if rule.retry_window == Some(0) || rule.whitelist_ttl == Some(0) {
        return Err("retry-window and whitelist-ttl must be at least 1s".to_owned());
    }
    let eff = rule.over(global);
    if eff.delay > eff.retry_window {
        return Err(format!(
            "delay ({}) is longer than the retry-window ({}): no retry could ever pass",
            format_duration(eff.delay),
            format_duration(eff.retry_window)
        ));
    }
    Ok(())
}

/// A domain name's structure: non-empty labels of letters, digits, `-` and `_` (internationalised
/// names as their UTF-8 too), no control characters or spaces.
fn check_domain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".to_owned());
    }
    if name.len() > 253 {
        return Err("longer than 253 characters".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || matches!(c, '@' | '=' | '/' | '#'))
    {
        return Err(format!("character {bad:?}"));
    }
    if name.split('.').any(str::is_empty) {
        return Err("empty label (leading, trailing or doubled '.')".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> DomainPolicies {
        let mut d = DomainPolicies::default();
        d.add_text("t", text, &Policy::default()).unwrap();
        d
    }

    fn error(text: &str) -> String {
        let mut d = DomainPolicies::default();
        let e = d.add_text("f", text, &Policy::default()).unwrap_err();
        assert!(d.is_empty(), "a bad file adds nothing");
        e.to_string()
    }

    #[test]
    fn each_form_parses() {
        let d = load(
            "# comment\n\
             Example.COM off\n\
             example.org delay=60s   # trailing comment\n\
             example.net dry-run\n\
             \n\
             .sub.example delay=1m retry-window=1h whitelist-ttl=7d dry-run\n",
        );
        assert_eq!(d.len(), 4);
        assert_eq!(
            d.lookup("example.com"),
            Some(DomainRule {
                off: true,
                ..DomainRule::default()
            })
        );
        assert_eq!(d.lookup("example.org").unwrap().delay, Some(60));
        assert!(d.lookup("example.net").unwrap().dry_run);
        let s = d.lookup("a.sub.example").unwrap();
        assert_eq!(
            (s.delay, s.retry_window, s.whitelist_ttl, s.dry_run, s.off),
            (Some(60), Some(3600), Some(7 * 86_400), true, false)
        );
        // `.sub.example` is its subdomains, not itself; an exact name is not its subdomains.
        assert_eq!(d.lookup("sub.example"), None);
        assert_eq!(d.lookup("www.example.com"), None);
        assert_eq!(d.lookup("other.test"), None);
    }

    #[test]
    fn most_specific_wins() {
        let d = load(
            ".com dry-run\n\
             .example.com delay=10s\n\
             .b.example.com delay=20s\n\
             b.example.com delay=30s\n",
        );
        assert_eq!(d.lookup("b.example.com").unwrap().delay, Some(30));
        assert_eq!(d.lookup("a.b.example.com").unwrap().delay, Some(20));
        assert_eq!(d.lookup("x.example.com").unwrap().delay, Some(10));
        assert_eq!(
            d.lookup("example.com").unwrap().delay,
            None,
            "only .com applies"
        );
        assert!(d.lookup("example.com").unwrap().dry_run);
        assert_eq!(d.lookup("com"), None);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let cases = [
            ("a.test off\nb.test frobnicate\n", "f:2: unknown setting \"frobnicate\""),
            ("a.test off delay=1s\n", "f:1: \"a.test\" is off and has other settings"),
            ("a.test off dry-run\n", "f:1: \"a.test\" is off"),
            ("a.test off\n\nA.TEST dry-run\n", "f:3: \"a.test\" is listed twice (also on line 1)"),
            ("a.test delay=1s delay=2s\n", "f:1: \"delay\" is given twice"),
            ("a.test delay=soon\n", "f:1: delay of \"a.test\": "),
            ("a.test delay\n", "f:1: \"delay\" needs a duration"),
            ("a.test off=yes\n", "f:1: \"off\" takes no value"),
            ("a.test\n", "f:1: \"a.test\" has no setting"),
            ("a..test off\n", "f:1: invalid domain \"a..test\""),
            ("me@a.test off\n", "f:1: invalid domain"),
            ("a.test retry-window=3d\n", "f:1: retry-window=3d is longer than the global retry-window (2d): records live by the global settings"),
            ("a.test whitelist-ttl=40d\n", "f:1: whitelist-ttl=40d is longer than the global whitelist-ttl (5w)"),
            ("a.test retry-window=1m\n", "f:1: delay (5m) is longer than the retry-window (1m)"),
            ("a.test retry-window=0s\n", "f:1: retry-window and whitelist-ttl must be at least 1s"),
        ];
        for (text, want) in cases {
            let got = error(text);
            assert!(
                got.starts_with(want),
                "{text:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn duplicates_across_files_are_refused() {
        let mut d = DomainPolicies::default();
        let p = Policy::default();
        d.add_text("one", ".a.test off\n", &p).unwrap();
        let e = d
            .add_text("two", "x.test off\n.A.test dry-run\n", &p)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("two:2: \".a.test\" is listed twice"),
            "{e}"
        );
        assert_eq!(d.len(), 1, "the second file is not half-added");
        // The exact name and the suffix of one name are two entries.
        d.add_text("three", "a.test dry-run\n", &p).unwrap();
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn rule_over_the_global_policy() {
        let g = Policy::default();
        let r = DomainRule {
            delay: Some(1),
            whitelist_ttl: Some(3600),
            dry_run: true,
            ..DomainRule::default()
        };
        let p = r.over(&g);
        assert_eq!(
            (p.delay, p.retry_window, p.whitelist_ttl, p.dry_run),
            (1, g.retry_window, 3600, true)
        );
        assert_eq!(p.awl_clients, g.awl_clients);
        assert_eq!(DomainRule::default().over(&g), g);
    }

    #[test]
    fn a_million_domains_load() {
        use std::fmt::Write;
        let mut text = String::with_capacity(1_000_000 * 30);
        for i in 0..1_000_000u32 {
            let setting = match i % 4 {
                0 => "off",
                1 => "delay=1m",
                2 => "dry-run",
                _ => "whitelist-ttl=7d retry-window=1d",
            };
            let dot = if i % 10 == 0 { "." } else { "" };
            writeln!(text, "{dot}d{i}.example.test {setting}").unwrap();
        }
        let d = load(&text);
        assert_eq!(d.len(), 1_000_000);
        assert_eq!(d.lookup("d1.example.test").unwrap().delay, Some(60));
        assert!(d.lookup("www.d20.example.test").unwrap().off);
        assert_eq!(d.lookup("d20.example.test"), None);
    }
}
