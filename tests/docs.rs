//! The README's configuration reference against config/berth.toml, the commented reference
//! config: every key the file shows is described in the README's tables, exactly once, under
//! its own section, and the tables describe no key the file lacks.

use pulldown_cmark::{Event, HeadingLevel, Parser, Tag, TagEnd};
use std::collections::BTreeMap;
use std::path::Path;

/// A key and the section it belongs to, written as in a header: `[server]`, `[storage.s3]`,
/// `[[namespace]]`.
type Key = (String, String);

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every key of a commented reference config, commented out or not. A line counts when, with
/// one leading `#` taken off, it is TOML on its own (a header or a `key = value`); prose and
/// continuation comments are not.
fn config_keys(text: &str) -> Vec<Key> {
    let mut doc = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix('#').unwrap_or(line).trim();
        if line.parse::<toml::Table>().is_ok_and(|t| !t.is_empty()) {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    let table: toml::Table = doc.parse().unwrap_or_else(|e| panic!("the uncommented reference config does not parse: {e}\n{doc}"));
    let mut out = Vec::new();
    walk("", &table, &mut out);
    out
}

fn walk(path: &str, table: &toml::Table, out: &mut Vec<Key>) {
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    for (k, v) in table {
        match v {
            toml::Value::Table(t) => walk(&join(k), t, out),
            toml::Value::Array(items) if !items.is_empty() && items.iter().all(|i| i.is_table()) => {
                for item in items {
                    walk(&format!("[{}]", join(k)), item.as_table().unwrap(), out);
                }
            }
            _ => {
                assert!(!path.is_empty(), "key {k} outside every section");
                // `[[namespace]]` comes here as "[namespace]": one more pair of brackets either way.
                out.push((format!("[{path}]"), k.clone()));
            }
        }
    }
}

/// Every key in the tables of the README's "Configuration reference" section, with the
/// section the paragraph before each table names in its first code span (`` `[server]` ``).
/// A row's keys are the code spans of its first cell (`` `tls_listen`, `tls_cert` ``).
fn readme_keys(text: &str) -> Vec<Key> {
    let mut out = Vec::new();
    let (mut in_reference, mut heading, mut heading_text) = (false, false, String::new());
    let (mut paragraph, mut first_code_seen, mut section) = (false, false, None::<String>);
    let (mut in_table, mut in_head, mut cell) = (false, false, 0usize);
    for event in Parser::new_ext(text, pulldown_cmark::Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Heading { level: HeadingLevel::H2, .. }) => {
                heading = true;
                heading_text.clear();
            }
            Event::Text(t) if heading => heading_text.push_str(&t),
            Event::End(TagEnd::Heading(HeadingLevel::H2)) => {
                heading = false;
                in_reference = heading_text.trim() == "Configuration reference";
                section = None;
            }
            _ if !in_reference => {}
            Event::Start(Tag::Paragraph) => (paragraph, first_code_seen) = (true, false),
            Event::End(TagEnd::Paragraph) => paragraph = false,
            Event::Code(c) if paragraph && !first_code_seen => {
                first_code_seen = true;
                if c.starts_with('[') && c.ends_with(']') {
                    section = Some(c.to_string());
                }
            }
            Event::Start(Tag::Table(_)) => in_table = true,
            Event::End(TagEnd::Table) => {
                in_table = false;
                // A later table needs a section of its own.
                section = None;
            }
            Event::Start(Tag::TableHead) => in_head = true,
            Event::End(TagEnd::TableHead) => in_head = false,
            Event::Start(Tag::TableRow) => cell = 0,
            Event::End(TagEnd::TableCell) => cell += 1,
            Event::Code(c) if in_table && !in_head && cell == 0 => {
                let s = section.clone().unwrap_or_else(|| panic!("a reference table (key `{c}`) follows no `[section]` paragraph"));
                out.push((s, c.to_string()));
            }
            _ => {}
        }
    }
    out
}

fn counts(keys: &[Key]) -> BTreeMap<&Key, usize> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

fn show(keys: &[&Key]) -> String {
    keys.iter().map(|(s, k)| format!("{s} {k}")).collect::<Vec<_>>().join(", ")
}

#[test]
fn readme_reference_describes_every_config_key_once() {
    let config = config_keys(&read("config/berth.toml"));
    let readme = readme_keys(&read("README.md"));
    assert!(config.len() >= 40, "only {} keys read from config/berth.toml: {config:?}", config.len());
    assert!(readme.len() >= 40, "only {} keys read from the README's reference: {readme:?}", readme.len());
    let (in_config, in_readme) = (counts(&config), counts(&readme));
    let twice: Vec<_> = in_readme.iter().filter(|(_, n)| **n > 1).map(|(k, _)| *k).collect();
    assert!(twice.is_empty(), "the README's configuration reference lists these more than once: {}", show(&twice));
    let undocumented: Vec<_> = in_config.keys().filter(|k| !in_readme.contains_key(*k)).copied().collect();
    assert!(
        undocumented.is_empty(),
        "config/berth.toml has keys the README's configuration reference does not describe: {}",
        show(&undocumented)
    );
    let unknown: Vec<_> = in_readme.keys().filter(|k| !in_config.contains_key(*k)).copied().collect();
    assert!(unknown.is_empty(), "the README's configuration reference describes keys config/berth.toml lacks: {}", show(&unknown));
}

#[test]
fn the_readers_see_sections_comments_and_tables() {
    let mut config = config_keys(
        "[server]\n# listen = \"a\"   # why\n#                # (listen = \"\" turns it off)\n# Prose: not a key.\n\
         # [storage.s3]\n# bucket = \"b\"\n# [[namespace]]\n# prefix = \"team\"\n# pull = []\n",
    );
    let want = |v: &[(&str, &str)]| v.iter().map(|(s, k)| (s.to_string(), k.to_string())).collect::<Vec<_>>();
    config.sort();
    assert_eq!(config, want(&[("[[namespace]]", "prefix"), ("[[namespace]]", "pull"), ("[server]", "listen"), ("[storage.s3]", "bucket")]));
    let readme = readme_keys(
        "## Other\n\n`[server]`\n\n| key | default |\n| --- | --- |\n| `ignored` | `x` |\n\n## Configuration reference\n\n\
         Text with `code`.\n\n`[server]`\n\n| key | default |\n| --- | --- |\n| `listen` | `\"a\"` |\n| `tls_cert`, `tls_key` | unset |\n\n\
         `[[namespace]]`, once per namespace\n\n| key | default |\n| --- | --- |\n| `prefix` | required |\n\n## Next\n\n`[log]`\n\n\
         | key | default |\n| --- | --- |\n| `level` | `x` |\n",
    );
    assert_eq!(readme, want(&[("[server]", "listen"), ("[server]", "tls_cert"), ("[server]", "tls_key"), ("[[namespace]]", "prefix")]));
}
