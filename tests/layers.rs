//! The module structure of `src/` (docs/ARCHITECTURE.md, "Layers"): no
//! import cycle among its modules, and no module importing one from a layer
//! above its own. Read from the source text: every `crate::…` and
//! `super::…` path (in `use` items, grouped or not, and inline), resolved
//! to the module file that defines it.
//!
//! `cargo test --test layers -- --nocapture` prints the module graph's
//! upward edges and cycles when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may import its own layer's modules
/// (without a cycle) and those of the layers below; a module not listed
/// belongs to its parent's layer.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation: types and facilities every layer uses",
        &[
            "ids",
            "config",
            "error",
            "telemetry",
            "limits",
            "frames",
            "placement",
        ],
    ),
    (
        "storage engines: the store, the blob directory",
        &["store", "media"],
    ),
    ("who is online, and fan-out to them", &["hub"]),
    (
        "domains: the rules and write operations of each, and the export format",
        &["wallet", "writes", "chat", "accounts", "export"],
    ),
    ("the storage interface and its backends", &["storage"]),
    (
        "services fed by committed writes, and readers of the store",
        &["search", "status", "backup", "auth", "migrate"],
    ),
    (
        "surfaces: HTTP, WebSocket, admin socket, cluster links",
        &["api", "admin", "cluster"],
    ),
    (
        "processes: the server, the proxy, the bench",
        &["server", "proxy", "bench"],
    ),
    (
        "the binary: its subcommand runners (`src/cli/`, declared by main.rs)",
        &["cli"],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module file of the library: its path (`api::ws`) → its file.
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                let mut p = prefix.to_vec();
                p.push(name);
                walk(&path, &p, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut p = prefix.to_vec();
                if stem != "mod" {
                    p.push(stem.to_string());
                }
                if p.is_empty() || (p.len() == 1 && (p[0] == "lib" || p[0] == "main")) {
                    continue;
                }
                out.insert(p.join("::"), path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out
}

/// The source without comments and string literals (so that a path in a
/// doc comment or a message is not an import).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if j < b.len() && b[j] == b'"' {
                let end: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                j += 1;
                while j < b.len() && !b[j..].starts_with(&end) {
                    j += 1;
                }
                i = (j + end.len()).min(b.len());
                out.push_str("\"\"");
            } else {
                out.push('r');
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let rest = &b[i + 1..];
            let len = if rest.first() == Some(&b'\\') {
                rest.iter().position(|&c| c == b'\'').map(|p| p + 1)
            } else if rest.len() > 1 && rest[1] == b'\'' {
                Some(2)
            } else {
                None
            };
            match len {
                Some(n) => {
                    i += 1 + n;
                    out.push_str("' '");
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Every path a file names: `use` trees expanded, inline `crate::`,
/// `super::` and `self::` paths, each as its segments from the crate root
/// (`module` is the file's own module path).
fn paths(code: &str, module: &[String], children: &[String]) -> Vec<Vec<String>> {
    // `super` of a file `a/b.rs` (module a::b) is `a`; of `a/b/mod.rs`
    // (module a::b) also `a`. `self` is the module itself.
    let parent = |segs: &[String]| segs[..segs.len().saturating_sub(1)].to_vec();
    let resolve = |raw: &[String]| -> Option<Vec<String>> {
        let mut base: Vec<String>;
        let mut rest = raw;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base = Vec::new();
                rest = &rest[1..];
            }
            Some("super") => {
                base = module.to_vec();
                while rest.first().map(String::as_str) == Some("super") {
                    base = parent(&base);
                    rest = &rest[1..];
                }
            }
            Some("self") => {
                base = module.to_vec();
                rest = &rest[1..];
            }
            _ => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    };
    let mut out = Vec::new();
    // `use` items: expand their trees.
    let mut rest = code;
    while let Some(at) = find_word(rest, "use") {
        let after = &rest[at + 3..];
        let Some(end) = after.find(';') else { break };
        let tree = squeeze(&after[..end]);
        for p in expand(&tree) {
            let segs: Vec<String> = p.split("::").map(str::to_string).collect();
            if let Some(r) = resolve(&segs) {
                out.push(r);
            }
        }
        rest = &after[end..];
    }
    // Inline paths (and, in a parent, its children's: `accounts::signup`).
    let mut starts: Vec<String> = ["crate::", "super::", "self::"]
        .map(str::to_string)
        .to_vec();
    starts.extend(children.iter().map(|c| format!("{c}::")));
    for start in &starts {
        let start = start.as_str();
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let i = from + at;
            from = i + start.len();
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let tail: String = code[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segs: Vec<String> = tail
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if children.contains(&segs[0]) {
                let mut r = module.to_vec();
                r.extend(segs);
                out.push(r);
            } else if let Some(r) = resolve(&segs) {
                out.push(r);
            }
        }
    }
    out
}

/// Where the keyword `word` begins, as a whole word.
fn find_word(s: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = s[from..].find(word) {
        let i = from + at;
        let before = s[..i].chars().next_back();
        let after = s[i + word.len()..].chars().next();
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && after.is_some_and(char::is_whitespace)
        {
            return Some(i);
        }
        from = i + word.len();
    }
    None
}

/// A `use` tree with no whitespace but the single spaces around `as`.
fn squeeze(tree: &str) -> String {
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut out = String::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 && (*w == "as" || words[i - 1] == "as") {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim_start_matches("::");
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree);
        return vec![path.trim_end_matches("::").to_string()];
    };
    let prefix = &tree[..open];
    let inner = tree[open + 1..]
        .strip_suffix('}')
        .unwrap_or(&tree[open + 1..]);
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in inner.chars() {
        match c {
            '{' => {
                depth += 1;
                cur.push(c);
            }
            '}' => {
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            expand(&p).into_iter().map(move |s| {
                if s == "self" {
                    prefix.trim_end_matches("::").to_string()
                } else {
                    format!("{prefix}{s}")
                }
            })
        })
        .collect()
}

/// The module a path lands in: its longest prefix that is a module.
fn target(path: &[String], mods: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| mods.contains_key(m))
}

/// module → the modules it imports (a file's own `mod` declarations are
/// not imports; a parent that uses its children's items, or a child its
/// parent's, is).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let mut g = BTreeMap::new();
    for (name, file) in &mods {
        let text = std::fs::read_to_string(file).expect("read a source file");
        let code = code_only(&text);
        // Unit tests are not part of the structure.
        let code = match code.find("#[cfg(test)]") {
            Some(i) => &code[..i],
            None => &code[..],
        };
        let module: Vec<String> = name.split("::").map(str::to_string).collect();
        let children: Vec<String> = mods
            .keys()
            .filter_map(|m| m.strip_prefix(&format!("{name}::")))
            .filter(|c| !c.contains("::"))
            .map(str::to_string)
            .collect();
        let mut to = BTreeSet::new();
        for p in paths(code, &module, &children) {
            if let Some(t) = target(&p, &mods)
                && t != *name
            {
                to.insert(t);
            }
        }
        g.insert(name.clone(), to);
    }
    g
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap_or(module);
    LAYERS.iter().position(|(_, mods)| mods.contains(&top))
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(next) = t.g.get(v) {
            for w in next {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(lw));
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(iw));
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn every_module_has_a_layer() {
    let missing: Vec<String> = modules()
        .into_keys()
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "modules in no layer of tests/layers.rs: {missing:?}"
    );
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let g = graph();
    let mut up = Vec::new();
    for (from, tos) in &g {
        for to in tos {
            if let (Some(a), Some(b)) = (layer_of(from), layer_of(to))
                && b > a
            {
                up.push(format!(
                    "{from} ({}) -> {to} ({})",
                    LAYERS[a].0.split(':').next().unwrap_or(""),
                    LAYERS[b].0.split(':').next().unwrap_or("")
                ));
            }
        }
    }
    assert!(
        up.is_empty(),
        "{} imports run up a layer:\n{}",
        up.len(),
        up.join("\n")
    );
}

#[test]
fn no_import_cycles() {
    let g = graph();
    let found = cycles(&g);
    let mut report = String::new();
    for c in &found {
        report.push_str(&format!("cycle of {} modules: {}\n", c.len(), c.join(", ")));
        for m in c {
            for to in &g[m] {
                if c.contains(to) {
                    report.push_str(&format!("  {m} -> {to}\n"));
                }
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

/// The reader itself: a grouped `use` and inline paths resolve.
#[test]
fn the_reader_reads_use_trees_and_inline_paths() {
    assert_eq!(
        expand(&squeeze("crate::{a, b::{c, self},\n d::e as f}")),
        ["crate::a", "crate::b::c", "crate::b", "crate::d::e"]
    );
    let code =
        code_only("use super::x; // crate::not\nfn f() { crate::y::z(); let s = \"crate::no\"; }");
    let m = vec!["a".to_string(), "b".to_string()];
    let p = paths(&code, &m, &[]);
    assert!(p.contains(&vec!["a".into(), "x".into()]), "{p:?}");
    assert!(p.contains(&vec!["y".into(), "z".into()]), "{p:?}");
    assert!(
        p.iter()
            .all(|s| s.last().is_some_and(|l| l != "not" && l != "no")),
        "{p:?}"
    );
}

/// No source file is over ~700 lines (its unit tests not counted): a file
/// that grows past that holds more than one concern and is split.
#[test]
fn no_source_file_is_over_700_lines() {
    let mut long = Vec::new();
    let mut files: Vec<PathBuf> = modules().into_values().collect();
    files.push(src().join("main.rs"));
    files.push(src().join("lib.rs"));
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let lines = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .count();
        if lines > 700 {
            long.push(format!("{} ({lines} lines)", file.display()));
        }
    }
    assert!(long.is_empty(), "files over 700 lines: {long:?}");
}
