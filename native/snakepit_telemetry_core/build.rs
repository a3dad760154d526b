//! Build steps:
//!
//! 1. Compile `proto/snakepit_bridge.proto` with protox (pure Rust, so no
//!    `protoc` is needed) into prost messages plus the tonic client and
//!    server (the server serves the crate's own tests).
//! 2. Read `catalog.toml`, the single source of truth for events, check it,
//!    and generate the symbol table and event table that `src/catalog.rs`
//!    includes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalog {
    event: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    event: String,
    python: Option<String>,
    doc: String,
    measurements: BTreeMap<String, String>,
    metadata: Vec<String>,
}

/// Metadata keys that arrive as atoms besides those the events list: the
/// standard keys of Python events that the NIF sets (`correlation_id` from
/// its field, `emit_time` from the timestamp).
const EXTRA_METADATA_KEYS: &[&str] = &["correlation_id", "emit_time"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let root = manifest.join("../../proto");
    let proto = root.join("snakepit_bridge.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([&proto], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    let path = manifest.join("catalog.toml");
    println!("cargo:rerun-if-changed={}", path.display());
    let catalog: Catalog = toml::from_str(&std::fs::read_to_string(&path)?)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(out.join("catalog_generated.rs"), generate(&catalog)?)?;
    Ok(())
}

fn unit(name: &str) -> Result<&'static str, String> {
    Ok(match name {
        "native_time" => "Unit::NativeTime",
        "bytes" => "Unit::Bytes",
        "count" => "Unit::Count",
        "percent" => "Unit::Percent",
        other => return Err(format!("unknown unit {other:?}")),
    })
}

fn check_ident(name: &str, what: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "catalog: {what} {name:?} is not a lowercase identifier"
        ))
    }
}

/// A symbol as a Rust identifier: raw (`r#type`) when it is a keyword.
fn ident(name: &str) -> String {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum",
        "extern", "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move",
        "mut", "pub", "ref", "return", "static", "struct", "trait", "true", "type", "unsafe",
        "use", "where", "while", "abstract", "become", "box", "do", "final", "gen", "macro",
        "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
    ];
    if KEYWORDS.contains(&name) {
        format!("r#{name}")
    } else {
        name.to_string()
    }
}

fn generate(catalog: &Catalog) -> Result<String, String> {
    // Symbols in first-seen order: segments, measurement keys, metadata keys.
    let mut symbols: Vec<String> = Vec::new();
    let mut add = |s: &str, what: &str| -> Result<(), String> {
        check_ident(s, what)?;
        if !symbols.iter().any(|x| x == s) {
            symbols.push(s.to_string());
        }
        Ok(())
    };
    let mut units: BTreeMap<&str, &str> = BTreeMap::new();
    let mut seen_events = Vec::new();
    let mut seen_python = Vec::new();
    for e in &catalog.event {
        let segments: Vec<&str> = e.event.split('.').collect();
        if segments.first() != Some(&"snakepit") || segments.len() < 3 {
            return Err(format!(
                "catalog: {:?} must be snakepit.<component>...",
                e.event
            ));
        }
        if seen_events.contains(&e.event) {
            return Err(format!("catalog: {:?} is listed twice", e.event));
        }
        seen_events.push(e.event.clone());
        if let Some(p) = &e.python {
            if seen_python.contains(p) {
                return Err(format!("catalog: python name {p:?} is listed twice"));
            }
            seen_python.push(p.clone());
        }
        for s in &segments {
            add(s, "event segment")?;
        }
        for (key, u) in &e.measurements {
            add(key, "measurement key")?;
            let u = unit(u)?;
            if let Some(prev) = units.insert(key, u) {
                if prev != u {
                    return Err(format!("catalog: measurement {key:?} has two units"));
                }
            }
        }
        for key in &e.metadata {
            add(key, "metadata key")?;
        }
    }
    for key in EXTRA_METADATA_KEYS {
        add(key, "metadata key")?;
    }

    let mut code = String::new();
    let w = &mut code;
    writeln!(
        w,
        "// Generated by build.rs from catalog.toml. Do not edit."
    )
    .unwrap();
    writeln!(w, "symbols! {{").unwrap();
    for s in &symbols {
        writeln!(w, "    {} => {s:?},", ident(s)).unwrap();
    }
    writeln!(w, "}}\n").unwrap();
    writeln!(w, "mod table {{").unwrap();
    writeln!(
        w,
        "    use super::{{EventSpec, MeasurementSpec, Sym, Unit}};\n"
    )
    .unwrap();
    writeln!(
        w,
        "    pub static EXTRA_METADATA_KEYS: &[Sym] = &[{}];\n",
        EXTRA_METADATA_KEYS
            .iter()
            .map(|k| format!("Sym::{}", ident(k)))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    writeln!(w, "    pub static EVENTS: &[EventSpec] = &[").unwrap();
    for e in &catalog.event {
        let name: Vec<String> = e
            .event
            .split('.')
            .map(|s| format!("Sym::{}", ident(s)))
            .collect();
        let measurements: Vec<String> = e
            .measurements
            .iter()
            .map(|(k, u)| {
                format!(
                    "MeasurementSpec {{ key: Sym::{}, unit: {} }}",
                    ident(k),
                    unit(u).expect("checked")
                )
            })
            .collect();
        let metadata: Vec<String> = e
            .metadata
            .iter()
            .map(|k| format!("Sym::{}", ident(k)))
            .collect();
        writeln!(w, "        EventSpec {{").unwrap();
        writeln!(w, "            python: {:?},", e.python).unwrap();
        writeln!(w, "            name: &[{}],", name.join(", ")).unwrap();
        writeln!(
            w,
            "            measurements: &[{}],",
            measurements.join(", ")
        )
        .unwrap();
        writeln!(w, "            metadata: &[{}],", metadata.join(", ")).unwrap();
        writeln!(w, "            doc: {:?},", e.doc).unwrap();
        writeln!(w, "        }},").unwrap();
    }
    writeln!(w, "    ];").unwrap();
    writeln!(w, "}}").unwrap();
    Ok(code)
}
