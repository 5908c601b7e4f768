//! `twin modules …` (the registry, and `run`: scoring offline with no server) and `twin score`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use twin_client::Client;
use twin_core::projection::ModuleInfo;
use twin_plugins::{
    CandidatePair, Compiler, Grants, Host, HostConfig, Limits, Module, ModuleKind, PluginError,
    Rollout,
};

use crate::Failure;

#[derive(Subcommand)]
pub enum ModulesCommand {
    /// Upload a Wasm component; the server compiles and describes it, then registers it.
    Add {
        file: PathBuf,
        /// Point this registry name at it.
        #[arg(long)]
        name: Option<String>,
    },
    /// List registered modules.
    Ls,
    /// Show one module (by name or hash), with its parameter schema.
    Describe { reference: String },
    /// Point registry name NAME at module HASH (later jobs naming NAME use it).
    Use { name: String, hash: String },
    /// Run a module over a JSONL file offline, without a server: one JSON result per line.
    Run(RunArgs),
    /// Load a module offline and print what it declares: descriptor, imports, capabilities.
    Inspect { module: PathBuf },
}

#[derive(Args)]
pub struct RunArgs {
    /// The component (.wasm).
    pub module: PathBuf,
    /// JSONL input: rollouts for a reward, candidate pairs for a filter.
    #[arg(long)]
    pub input: PathBuf,
    /// The module's parameters, a JSON object.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Grant the `lookup` capability with this JSON object of strings as its table.
    #[arg(long)]
    pub grant_lookup: Option<PathBuf>,
    /// Lines per module call.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Fuel per call (default: the host's).
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Print capability calls to stderr.
    #[arg(long)]
    pub show_calls: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// JSONL rollouts: `completion`, `ground_truth`, optional `prompt`, `question_type`, `metadata`.
    #[arg(long)]
    pub rollouts: PathBuf,
    /// A reward module (name or hash).
    #[arg(long, conflicts_with = "term", required_unless_present = "term")]
    pub module: Option<String>,
    /// Parameters of --module, a JSON object.
    #[arg(long, default_value = "{}", requires = "module")]
    pub params: String,
    /// A weighted-sum term NAME=MODULE:WEIGHT (repeat for each term).
    #[arg(long)]
    pub term: Vec<String>,
    /// Grant the `lookup` capability with this JSON object of strings.
    #[arg(long)]
    pub grant_lookup: Option<PathBuf>,
    #[arg(long)]
    pub experiment: Option<String>,
    /// Wait for the job and print its result.
    #[arg(long)]
    pub wait: bool,
}

fn lookup_table(path: &Option<PathBuf>) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(path) = path else { return Ok(None) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: std::collections::BTreeMap<String, String> = serde_json::from_str(&text)
        .with_context(|| format!("{}: a JSON object of strings", path.display()))?;
    Ok(Some(serde_json::to_value(table)?))
}

fn print_module(m: &ModuleInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
    } else {
        let r = &m.module;
        println!(
            "{} {} {} ({}, {} bytes)",
            r.hash, r.name, r.version, r.kind, r.size
        );
        println!("  {}", r.summary);
        if !m.aliases.is_empty() {
            println!("  names: {}", m.aliases.join(", "));
        }
        if !r.capabilities.is_empty() {
            println!("  needs capabilities: {}", r.capabilities.join(", "));
        }
        println!("  parameters: {}", r.parameters_schema);
    }
    Ok(())
}

pub async fn online(client: &Client, command: ModulesCommand, json: bool) -> Result<(), Failure> {
    match command {
        ModulesCommand::Add { file, name } => {
            if file.is_dir() {
                return Err(anyhow!(
                    "{} is a directory: a module is one `.wasm` file; to register a model \
                     checkpoint directory use `twin models add {}`",
                    file.display(),
                    file.display()
                )
                .into());
            }
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let m = client.add_module(bytes.into(), name.as_deref()).await?;
            print_module(&m, json)?;
        }
        ModulesCommand::Ls => {
            let modules = client.modules().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&modules)?);
            } else {
                println!(
                    "{:<64}  {:<6}  {:<20}  {:<8}  names",
                    "hash", "kind", "name", "version"
                );
                for m in modules {
                    let r = &m.module;
                    println!(
                        "{:<64}  {:<6}  {:<20}  {:<8}  {}",
                        r.hash.to_hex(),
                        r.kind,
                        r.name,
                        r.version,
                        m.aliases.join(",")
                    );
                }
            }
        }
        ModulesCommand::Describe { reference } => {
            print_module(&client.module(&reference).await?, json)?
        }
        ModulesCommand::Use { name, hash } => {
            let m = client.set_module_alias(&name, &hash).await?;
            if json {
                print_module(&m, true)?;
            } else {
                println!("{name} → {}", m.module.hash);
            }
        }
        ModulesCommand::Run(_) | ModulesCommand::Inspect { .. } => {
            unreachable!("`modules run` and `modules inspect` are offline")
        }
    }
    Ok(())
}

fn parse_term(term: &str) -> anyhow::Result<serde_json::Value> {
    let (name, rest) = term
        .split_once('=')
        .ok_or_else(|| anyhow!("--term {term:?}: expected NAME=MODULE:WEIGHT"))?;
    let (module, weight) = rest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--term {term:?}: expected NAME=MODULE:WEIGHT"))?;
    let weight: f64 = weight
        .parse()
        .map_err(|_| anyhow!("--term {term:?}: the weight must be a number"))?;
    Ok(serde_json::json!({"name": name, "module": module, "weight": weight}))
}

/// `twin score`: uploads the rollouts and submits a `score` job.
pub async fn score(client: &Client, args: ScoreArgs) -> Result<serde_json::Value, Failure> {
    let bytes = std::fs::read(&args.rollouts)
        .with_context(|| format!("reading {}", args.rollouts.display()))?;
    // Checked here so a typo is reported with its line before anything is uploaded.
    let n = twin_plugins::parse_rollouts(&bytes)
        .map_err(|e| anyhow!(e))?
        .len();
    let stored = client.put_blob(bytes.into()).await?;
    let reward = match &args.module {
        Some(m) => {
            let params: serde_json::Value =
                serde_json::from_str(&args.params).context("--params must be a JSON object")?;
            serde_json::json!({"module": m, "params": params})
        }
        None => serde_json::json!({
            "weighted_sum": args.term.iter().map(|t| parse_term(t)).collect::<anyhow::Result<Vec<_>>>()?
        }),
    };
    let mut spec = serde_json::json!({
        "kind": "score",
        "rollouts": stored.hash.to_hex(),
        "reward": reward,
    });
    if let Some(table) = lookup_table(&args.grant_lookup)? {
        spec["grants"] = serde_json::json!({ "lookup": table });
    }
    let mut submission = serde_json::json!({ "spec": spec });
    if let Some(e) = args.experiment {
        submission["experiment"] = e.into();
    }
    eprintln!("uploaded {n} rollouts as blob {}", stored.hash);
    Ok(submission)
}

/// Where `twin modules run` keeps compiled modules between runs.
fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|c| c.join("twin").join("module-cache"))
}

enum Line {
    Bad(String),
    Reward(Rollout),
    Pair(CandidatePair),
}

fn offline_host() -> anyhow::Result<Host> {
    Host::new(HostConfig {
        cache_dir: cache_dir(),
        compiler: Compiler::InProcess,
        ..HostConfig::default()
    })
    .map_err(|e| anyhow!("{e}"))
}

fn load(host: &Host, path: &Path) -> anyhow::Result<std::sync::Arc<Module>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    host.load(&bytes)
        .map_err(|e| anyhow!("{}: {e} [{}]", path.display(), e.code()))
}

/// `twin modules inspect`: always JSON, for scripts (CI checks templates import nothing).
pub fn inspect(path: &Path) -> Result<(), Failure> {
    let host = offline_host()?;
    let m = load(&host, path)?;
    let out = serde_json::json!({
        "hash": m.hash,
        "size": m.size,
        "descriptor": m.descriptor,
        "imports": m.imports,
        "capabilities": m.capabilities,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `twin modules run`: exit 0 when every line was scored, 1 when some line failed.
pub fn run(args: &RunArgs) -> Result<(), Failure> {
    let host = offline_host()?;
    let module = load(&host, &args.module)?;
    let grants = Grants {
        lookup: lookup_table(&args.grant_lookup)?
            .map(serde_json::from_value)
            .transpose()?,
    };
    let limits = Limits {
        fuel: args.fuel.unwrap_or(host.config().limits.fuel),
        ..host.config().limits
    };
    let input = std::fs::File::open(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(input).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", args.input.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = match module.kind() {
            ModuleKind::Reward => serde_json::from_str(&line).map(Line::Reward),
            ModuleKind::Filter => serde_json::from_str(&line).map(Line::Pair),
        };
        lines.push(parsed.unwrap_or_else(|e| Line::Bad(format!("line {}: {e}", i + 1))));
    }
    let ctx = Ctx {
        host: &host,
        module: &module,
        params: &args.params,
        grants: &grants,
        limits: &limits,
        show_calls: args.show_calls,
    };
    let mut out = std::io::stdout().lock();
    let mut failed = 0usize;
    for chunk in lines.chunks(args.batch_size.max(1)) {
        for (ok, result) in ctx.batch(chunk) {
            if !ok {
                failed += 1;
            }
            writeln!(out, "{result}")?;
        }
    }
    out.flush()?;
    if failed > 0 {
        return Err(Failure {
            code: 1,
            error: anyhow!("{failed} of {} lines failed", lines.len()),
        });
    }
    Ok(())
}

struct Ctx<'a> {
    host: &'a Host,
    module: &'a Module,
    params: &'a str,
    grants: &'a Grants,
    limits: &'a Limits,
    show_calls: bool,
}

impl Ctx<'_> {
    /// Results for a chunk of lines, in order. A failed call is retried line by line so the
    /// error lands on the line that caused it.
    fn batch(&self, chunk: &[Line]) -> Vec<(bool, String)> {
        let good: Vec<&Line> = chunk
            .iter()
            .filter(|l| !matches!(l, Line::Bad(_)))
            .collect();
        let results: Vec<(bool, String)> = match self.call(&good) {
            Ok(r) => r.into_iter().map(|l| (true, l)).collect(),
            Err(_) if good.len() > 1 => good
                .iter()
                .map(|l| match self.call(&[*l]) {
                    Ok(mut r) => (true, r.pop().unwrap_or_default()),
                    Err(e) => (false, error_json(&e)),
                })
                .collect(),
            Err(e) => vec![(false, error_json(&e)); good.len()],
        };
        let mut results = results.into_iter();
        chunk
            .iter()
            .map(|l| match l {
                Line::Bad(message) => (false, error_line(message)),
                _ => results.next().unwrap_or_default(),
            })
            .collect()
    }

    fn call(&self, lines: &[&Line]) -> Result<Vec<String>, PluginError> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        let (values, calls) = match self.module.kind() {
            ModuleKind::Reward => {
                let batch: Vec<Rollout> = lines
                    .iter()
                    .filter_map(|l| match l {
                        Line::Reward(r) => Some(r.clone()),
                        _ => None,
                    })
                    .collect();
                let out = self.host.score(
                    self.module,
                    self.params,
                    self.grants,
                    Some(self.limits),
                    &batch,
                )?;
                let values = out
                    .values
                    .iter()
                    .map(|s| {
                        line(&RewardLine {
                            score: s.score,
                            components: &s.components,
                        })
                    })
                    .collect();
                (values, out.calls)
            }
            ModuleKind::Filter => {
                let batch: Vec<CandidatePair> = lines
                    .iter()
                    .filter_map(|l| match l {
                        Line::Pair(p) => Some(p.clone()),
                        _ => None,
                    })
                    .collect();
                let out = self.host.judge(
                    self.module,
                    self.params,
                    self.grants,
                    Some(self.limits),
                    &batch,
                )?;
                let values = out
                    .values
                    .iter()
                    .map(|v| {
                        line(&FilterLine {
                            keep: v.keep,
                            reason: v.reason.as_deref(),
                        })
                    })
                    .collect();
                (values, out.calls)
            }
        };
        if self.show_calls {
            for c in calls {
                eprintln!("{}", serde_json::to_string(&c).unwrap_or_default());
            }
        }
        Ok(values)
    }
}

/// Output lines keep the documented field order (`score` first), which `json!` would sort.
#[derive(serde::Serialize)]
struct RewardLine<'a> {
    score: f64,
    components: &'a std::collections::BTreeMap<String, f64>,
}

#[derive(serde::Serialize)]
struct FilterLine<'a> {
    keep: bool,
    reason: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct ErrorLine<'a> {
    error: &'a str,
}

fn line<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn error_line(message: &str) -> String {
    line(&ErrorLine { error: message })
}

fn error_json(e: &PluginError) -> String {
    error_line(&format!("{e} [{}]", e.code()))
}
