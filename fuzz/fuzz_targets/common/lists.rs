//! What the list-file targets (`exempt`, `domains`, `trusted_certs`) share: the file's text,
//! the same file written differently, and the checks on a refused file.

use greyhound::engine::exempt::ExemptError;

/// The name every file is loaded under.
pub const SOURCE: &str = "fuzz.list";

const BOM: char = '\u{feff}';

/// The file's text: list files are read as UTF-8, so other bytes become U+FFFD here rather
/// than being thrown away.
pub fn text_of(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Whether the file is also loaded written differently: one input in 4, picked by its bytes
/// so a crash reproduces (three more loads and their questions for every input halved the
/// targets' speed).
pub fn cross_check(data: &[u8]) -> bool {
    data.iter()
        .fold(0u8, |a, &b| a.wrapping_mul(31).wrapping_add(b))
        % 4
        == 0
}

/// Lines of the file as the loaders number them (a leading byte-order mark is dropped).
pub fn line_count(text: &str) -> usize {
    text.strip_prefix(BOM).unwrap_or(text).lines().count()
}

/// The entries as the file format defines them, numbered from 1: `#` starts a comment at
/// the start of a line or after whitespace, blanks around an entry do not count. Written
/// here from the format's description, not taken from the library.
pub fn entries(text: &str) -> Vec<(usize, String)> {
    let text = text.strip_prefix(BOM).unwrap_or(text);
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let b = line.as_bytes();
            let cut = (0..b.len())
                .find(|&j| b[j] == b'#' && (j == 0 || b[j - 1].is_ascii_whitespace()))
                .unwrap_or(b.len());
            let entry = line[..cut].trim();
            (!entry.is_empty()).then(|| (i + 1, entry.to_owned()))
        })
        .collect()
}

/// The same list written differently, and by how many lines its entries moved:
/// - two comment lines in front;
/// - CRLF line ends and a comment after every entry;
/// - the lines in reverse order (moves entries; only answers are compared).
pub fn variants(text: &str) -> [(String, Option<usize>); 3] {
    let body = text.strip_prefix(BOM).unwrap_or(text);
    let commented = format!("# a comment, as an administrator writes them\n\n{body}");
    let mut crlf = String::with_capacity(text.len() * 2);
    for line in text.split('\n') {
        crlf.push_str(line);
        crlf.push_str(" # trailing comment\r\n");
    }
    let mut lines: Vec<&str> = body.lines().collect();
    lines.reverse();
    // After an empty first line: a byte-order mark that was inside the file must not become
    // the file's first character, which the loaders drop.
    let reversed = format!("\n{}", lines.join("\n"));
    [(commented, Some(2)), (crlf, Some(0)), (reversed, None)]
}

/// A refusal names this file and a line inside it; returns that line.
pub fn refused_line(text: &str, err: &ExemptError) -> usize {
    match err {
        ExemptError::Parse {
            source_name, line, ..
        } => {
            assert_eq!(source_name, SOURCE);
            assert!(
                (1..=line_count(text)).contains(line),
                "error on line {line} of a {}-line file: {err}",
                line_count(text)
            );
            *line
        }
        ExemptError::Io { .. } => panic!("no file was read: {err}"),
    }
}

/// The error of a variant is the original's, moved by `shift` lines.
pub fn same_refusal(original: &ExemptError, variant: &ExemptError, shift: usize) {
    match (original, variant) {
        (ExemptError::Parse { line: a, .. }, ExemptError::Parse { line: b, .. }) => {
            assert_eq!(a + shift, *b, "{original} / {variant}");
        }
        _ => panic!("{original} / {variant}"),
    }
}

/// Words of the text to ask about: each entry's words, ASCII lower-cased, at most 16 (each
/// is asked about in several forms, against every load of the file).
pub fn words(text: &str) -> Vec<String> {
    let mut w: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '#')
        .filter(|w| !w.is_empty())
        .take(16)
        .map(str::to_ascii_lowercase)
        .collect();
    w.sort();
    w.dedup();
    w
}
