//! The deployment templates and the binary must agree.
//!
//! The Bicep files under `infra/` are parsed (tree-sitter-bicep, not grepped)
//! and compared with what the binary itself reports (`worker env-vars`,
//! `worker --help`), so that renaming a variable, a queue or a Key Vault entry
//! on one side without the other fails here instead of in Azure:
//!
//! - every environment variable a template sets on a container is one the
//!   binary reads, or a documented handler pass-through variable;
//! - secrets travel as `secureValue`, never as a plain `value`;
//! - the Logic App hands the queue message text to the container as `TASK_DATA`;
//! - queue names follow the binary's `<client>-tasks` / `<client>-tasks-poison`
//!   and `<client>-webhooks` / `<client>-webhooks-poison`, and no template
//!   accepts a client name longer than the binary does;
//! - task container groups get what single-task mode needs to write the webhook
//!   outbox (client, storage account, identity client id), and the drain
//!   workflow peeks `<client>-webhooks` and starts `worker deliver
//!   --exit-when-empty` in a group shaped like a task group;
//! - restart policy, CPU, memory and task timeout defaults are the documented ones;
//! - the Key Vault entry names map one-to-one onto environment variable names,
//!   in the vault, in the Logic App and in the manual test template;
//! - the Container Apps job runs `WORKER_MODE=job` with managed-identity queue
//!   auth, scales on `<client>-tasks` and on the due entries of
//!   `<client>-webhooks`, takes secrets only as Key Vault
//!   references named by the vault module, leaves retries to the queue
//!   (`replicaRetryLimit` 0, `parallelism` 1), and stops a replica only after
//!   the worker's own task timeout plus a margin that covers a webhook with
//!   all its retries and one outbox batch (checkov cannot compare the two
//!   expressions; this can).

// A panic with a message is how every function here reports a template that
// does not match; functions outside #[test] fns are test code all the same.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use tree_sitter::{Node, Parser};

/// Variables the templates set that the binary does not read itself: exec
/// handlers receive them. The binary gives a handler child process a scrubbed
/// environment (PATH, HOME, LANG) plus the names listed under `env` in that
/// handler's `[handlers.NAME]` table (WORKER_HANDLERS_FILE), so these reach
/// only the handlers that ask for them.
const HANDLER_PASS_THROUGH: &[&str] = &["SUPABASE_KEY", "OPENAI_API_KEY"];

/// Task container size and timeout, as infra/aci/README.md documents them.
const DOCUMENTED_CPU_CORES: &str = "1";
const DOCUMENTED_MEMORY_GB: &str = "2";
const DOCUMENTED_SIZE_TEXT: &str = "1 vCPU / 2 GB";

/// What the Logic App puts into TASK_DATA: the raw queue message text.
const MESSAGE_TEXT_EXPRESSION: &str = "@{triggerBody()?['MessageText']}";

// ---------------------------------------------------------------------------
// A small model of Bicep values, enough to read templates.

#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// A string literal; interpolations appear as `${expr}` in the text.
    Str {
        text: String,
        interpolated: bool,
    },
    Num(i64),
    Bool(bool),
    Null,
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
    /// Any other expression, as source text (`json(cpuCores)`, `vault.id`).
    Expr(String),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn at(&self, path: &[&str]) -> &Value {
        let mut v = self;
        for key in path {
            v = v
                .get(key)
                .unwrap_or_else(|| panic!("no `{}` in {v:?}", path.join(".")));
        }
        v
    }

    /// The text of a string without interpolation.
    fn literal(&self) -> Option<&str> {
        match self {
            Value::Str {
                text,
                interpolated: false,
            } => Some(text),
            _ => None,
        }
    }

    /// A string's text, interpolations included as `${expr}`.
    fn template(&self) -> Option<&str> {
        match self {
            Value::Str { text, .. } => Some(text),
            _ => None,
        }
    }

    fn items(&self) -> &[Value] {
        match self {
            Value::Array(items) => items,
            other => panic!("expected an array, found {other:?}"),
        }
    }

    /// Every value under `key`, at any depth.
    fn find_all<'a>(&'a self, key: &str, out: &mut Vec<&'a Value>) {
        match self {
            Value::Object(entries) => {
                for (k, v) in entries {
                    if k == key {
                        out.push(v);
                    }
                    v.find_all(key, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| v.find_all(key, out)),
            _ => {}
        }
    }

    /// The workflow action called `name`, at any depth (scopes, cases,
    /// branches). `runAfter` maps use action names as keys too; an action is
    /// the one that has a `type`.
    fn action(&self, name: &str) -> &Value {
        let mut found = Vec::new();
        self.find_all(name, &mut found);
        found.retain(|v| v.get("type").is_some());
        assert_eq!(
            found.len(),
            1,
            "expected exactly one action `{name}`, found {}",
            found.len()
        );
        found[0]
    }
}

struct Resource {
    symbol: String,
    /// `Microsoft.X/y@version`.
    ty: String,
    existing: bool,
    body: Value,
}

struct Module {
    path: String,
    body: Value,
}

struct Bicep {
    file: PathBuf,
    params: BTreeMap<String, Option<Value>>,
    /// Decorators of each param: decorator name -> first argument
    /// (`@minValue(60)` -> `minValue` -> `Num(60)`).
    param_decorators: BTreeMap<String, BTreeMap<String, Value>>,
    vars: BTreeMap<String, Value>,
    resources: Vec<Resource>,
    modules: Vec<Module>,
}

impl Bicep {
    fn load(relative: &str) -> Bicep {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        let src = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let mut parser = Parser::new();
        parser
            .set_language(&tree_sitter_bicep::LANGUAGE.into())
            .expect("the bicep grammar loads");
        let tree = parser
            .parse(&src, None)
            .expect("tree-sitter returns a tree");
        let root = tree.root_node();
        assert!(
            !root.has_error(),
            "{} does not parse as Bicep: {}",
            file.display(),
            first_error(root, &src)
        );
        let mut bicep = Bicep {
            file,
            params: BTreeMap::new(),
            param_decorators: BTreeMap::new(),
            vars: BTreeMap::new(),
            resources: Vec::new(),
            modules: Vec::new(),
        };
        let mut cursor = root.walk();
        // Decorators are a sibling node just before the declaration they decorate.
        let mut decorators = BTreeMap::new();
        for decl in root.named_children(&mut cursor) {
            let name = || first_named(decl, "identifier", &src);
            match decl.kind() {
                "decorators" => decorators = decorator_arguments(decl, &src),
                "parameter_declaration" => {
                    bicep
                        .params
                        .insert(name(), after_equals(decl).map(|v| value(v, &src)));
                    bicep
                        .param_decorators
                        .insert(name(), std::mem::take(&mut decorators));
                }
                "variable_declaration" => {
                    let v = after_equals(decl).expect("a var has a value");
                    bicep.vars.insert(name(), value(v, &src));
                }
                "resource_declaration" => {
                    let ty = first_named_node(decl, "string").expect("resource type");
                    let mut c = decl.walk();
                    let existing = decl.children(&mut c).any(|n| n.kind() == "existing");
                    let body = unwrap_body(after_equals(decl).expect("resource body"));
                    bicep.resources.push(Resource {
                        symbol: name(),
                        ty: value(ty, &src).literal().expect("literal type").into(),
                        existing,
                        body: value(body, &src),
                    });
                }
                "module_declaration" => {
                    let path = first_named_node(decl, "string").expect("module path");
                    let body = unwrap_body(after_equals(decl).expect("module body"));
                    bicep.modules.push(Module {
                        path: value(path, &src).literal().expect("literal path").into(),
                        body: value(body, &src),
                    });
                }
                _ => {}
            }
        }
        bicep
    }

    fn param_default(&self, name: &str) -> &Value {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("{}: no param `{name}`", self.file.display()))
            .as_ref()
            .unwrap_or_else(|| panic!("{}: param `{name}` has no default", self.file.display()))
    }

    fn param_int_default(&self, name: &str) -> i64 {
        match self.param_default(name) {
            Value::Num(n) => *n,
            other => panic!(
                "{}: param `{name}` defaults to {other:?}, not a number",
                self.file.display()
            ),
        }
    }

    /// The `@minValue` of an int param.
    fn param_min(&self, name: &str) -> i64 {
        match self
            .param_decorators
            .get(name)
            .and_then(|d| d.get("minValue"))
        {
            Some(Value::Num(n)) => *n,
            other => panic!(
                "{}: param `{name}` has no numeric @minValue ({other:?})",
                self.file.display()
            ),
        }
    }

    fn var(&self, name: &str) -> &Value {
        self.vars
            .get(name)
            .unwrap_or_else(|| panic!("{}: no var `{name}`", self.file.display()))
    }

    fn resources_of(&self, ty: &str) -> Vec<&Resource> {
        self.resources
            .iter()
            .filter(|r| r.ty.split('@').next() == Some(ty) && !r.existing)
            .collect()
    }

    fn module(&self, path: &str) -> &Module {
        self.modules
            .iter()
            .find(|m| m.path == path)
            .unwrap_or_else(|| panic!("{}: no module `{path}`", self.file.display()))
    }
}

/// `@name(arg, ...)` -> name -> first argument, for each decorator.
fn decorator_arguments(decorators: Node, src: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut cursor = decorators.walk();
    for decorator in decorators.named_children(&mut cursor) {
        let Some(call) = first_named_node(decorator, "call_expression") else {
            continue;
        };
        let name = first_named(call, "identifier", src);
        let argument = first_named_node(call, "arguments").and_then(|args| {
            let mut c = args.walk();
            let first = args.named_children(&mut c).find(|n| n.kind() != "comment");
            first
        });
        if let Some(argument) = argument {
            out.insert(name, value(argument, src));
        }
    }
    out
}

/// Whether `param NAME` in FILE carries `@secure()` (a decorator without
/// arguments, which `param_decorators` does not keep).
fn param_is_secure(file: &str, name: &str) -> bool {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
        .unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
    let lines: Vec<&str> = src.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(&format!("param {name} ")))
        .unwrap_or_else(|| panic!("{file}: no param {name}"));
    lines[..at]
        .iter()
        .rev()
        .take_while(|l| l.starts_with('@'))
        .any(|l| l.trim() == "@secure()")
}

fn first_error(node: Node, src: &str) -> String {
    if node.is_error() || node.is_missing() {
        let p = node.start_position();
        let text: String = src[node.byte_range()].chars().take(60).collect();
        return format!("line {} column {}: {text:?}", p.row + 1, p.column + 1);
    }
    let mut cursor = node.walk();
    let children: Vec<Node> = node.children(&mut cursor).collect();
    children
        .into_iter()
        .filter(|c| c.has_error())
        .map(|c| first_error(c, src))
        .next()
        .unwrap_or_default()
}

fn first_named_node<'t>(node: Node<'t>, kind: &str) -> Option<Node<'t>> {
    let mut cursor = node.walk();
    let found = node.named_children(&mut cursor).find(|n| n.kind() == kind);
    found
}

fn first_named(node: Node, kind: &str, src: &str) -> String {
    let n = first_named_node(node, kind).unwrap_or_else(|| panic!("no {kind} in {}", node.kind()));
    src[n.byte_range()].to_owned()
}

fn after_equals(node: Node) -> Option<Node> {
    let mut cursor = node.walk();
    let mut seen = false;
    for child in node.children(&mut cursor) {
        if seen && child.is_named() && child.kind() != "comment" {
            return Some(child);
        }
        seen |= child.kind() == "=";
    }
    None
}

/// The object inside `[for ...: {...}]` or `if (...) {...}`.
fn unwrap_body(node: Node) -> Node {
    match node.kind() {
        "for_statement" => unwrap_body(node.child_by_field_name("body").expect("for body")),
        "if_statement" => {
            let mut cursor = node.walk();
            let last = node.named_children(&mut cursor).last().expect("if body");
            unwrap_body(last)
        }
        _ => node,
    }
}

fn value(node: Node, src: &str) -> Value {
    let text = &src[node.byte_range()];
    let mut cursor = node.walk();
    match node.kind() {
        "string" => {
            let mut out = String::new();
            let mut interpolated = false;
            for part in node.children(&mut cursor) {
                let t = &src[part.byte_range()];
                match part.kind() {
                    "string_content" => out.push_str(t),
                    "escape_sequence" => out.push_str(match t {
                        "\\n" => "\n",
                        "\\r" => "\r",
                        "\\t" => "\t",
                        other => &other[1..],
                    }),
                    "interpolation" => {
                        interpolated = true;
                        out.push_str(t);
                    }
                    _ => {}
                }
            }
            Value::Str {
                text: out,
                interpolated,
            }
        }
        "number" => text
            .parse()
            .map(Value::Num)
            .unwrap_or(Value::Expr(text.into())),
        "boolean" => Value::Bool(text == "true"),
        "null" => Value::Null,
        "array" => Value::Array(
            node.named_children(&mut cursor)
                .filter(|n| n.kind() != "comment")
                .map(|n| value(n, src))
                .collect(),
        ),
        "object" => Value::Object(
            node.named_children(&mut cursor)
                .filter(|n| n.kind() == "object_property")
                .map(|prop| {
                    let mut c = prop.walk();
                    let parts: Vec<Node> = prop
                        .named_children(&mut c)
                        .filter(|n| n.kind() != "comment")
                        .collect();
                    let key = match parts[0].kind() {
                        "string" => value(parts[0], src)
                            .template()
                            .expect("string key")
                            .to_owned(),
                        _ => src[parts[0].byte_range()].to_owned(),
                    };
                    let v = parts.last().expect("property value");
                    (key, value(*v, src))
                })
                .collect(),
        ),
        _ => Value::Expr(text.to_owned()),
    }
}

// ---------------------------------------------------------------------------
// What the binary says about itself.

struct EnvVar {
    secret: bool,
    default: Option<String>,
}

fn binary_env_vars() -> BTreeMap<String, EnvVar> {
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("env-vars")
        .output()
        .expect("run `worker env-vars`");
    assert!(
        out.status.success(),
        "`worker env-vars` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let vars: BTreeMap<String, EnvVar> = text
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("`worker env-vars` line is not JSON ({e}): {line}"));
            let name = v["name"].as_str().expect("name").to_owned();
            let var = EnvVar {
                secret: v["secret"].as_bool().expect("secret flag"),
                default: v["default"].as_str().map(str::to_owned),
            };
            (name, var)
        })
        .collect();
    assert!(
        vars.contains_key("TASK_DATA") && vars.contains_key("WORKER_CLIENT"),
        "`worker env-vars` lists too little to compare against: {:?}",
        vars.keys()
    );
    vars
}

fn binary_help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .arg("--help")
        .output()
        .expect("run `worker --help`");
    assert!(out.status.success(), "`worker {args:?} --help` failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

// ---------------------------------------------------------------------------
// The templates.

const FILES: &[&str] = &[
    "infra/containerapps/main.bicep",
    "infra/containerapps/job.bicep",
    "infra/aci/main.bicep",
    "infra/aci/worker-container.bicep",
    "infra/aci/logic-app-trigger.bicep",
    "infra/modules/storage.bicep",
    "infra/modules/registry.bicep",
    "infra/modules/identity.bicep",
    "infra/modules/keyvault.bicep",
    "infra/modules/monitoring.bicep",
    "infra/modules/container-group.bicep",
    "infra/modules/dashboard.bicep",
];

/// One `{ name, value | secureValue }` entry of a container's environment.
#[derive(Debug)]
struct EnvEntry {
    file: String,
    name: String,
    value: Option<Value>,
    secure_value: Option<Value>,
}

fn container_env_entries() -> Vec<EnvEntry> {
    let mut entries = Vec::new();
    for file in FILES {
        let bicep = Bicep::load(file);
        let mut lists = Vec::new();
        for r in &bicep.resources {
            r.body.find_all("environmentVariables", &mut lists);
        }
        for v in bicep.vars.values() {
            v.find_all("environmentVariables", &mut lists);
        }
        for list in lists {
            for item in list.items() {
                entries.push(EnvEntry {
                    file: file.to_string(),
                    name: item
                        .get("name")
                        .and_then(Value::literal)
                        .unwrap_or_else(|| {
                            panic!("{file}: env entry without literal name: {item:?}")
                        })
                        .to_owned(),
                    value: item.get("value").cloned(),
                    secure_value: item.get("secureValue").cloned(),
                });
            }
        }
    }
    entries
}

/// The definition of the workflow declared as `symbol` in logic-app-trigger.bicep.
fn workflow_definition(symbol: &str) -> Value {
    let bicep = Bicep::load("infra/aci/logic-app-trigger.bicep");
    let workflows = bicep.resources_of("Microsoft.Logic/workflows");
    let workflow = workflows
        .iter()
        .find(|w| w.symbol == symbol)
        .unwrap_or_else(|| panic!("workflow `{symbol}` in logic-app-trigger.bicep"));
    workflow.body.at(&["properties", "definition"]).clone()
}

/// The workflow definition of the queue-triggered Logic App.
fn trigger_definition() -> Value {
    workflow_definition("trigger")
}

/// Name -> `value` or `secureValue` of each environment variable in a list.
fn env_map(list: &Value) -> BTreeMap<String, Value> {
    list.items()
        .iter()
        .map(|item| {
            let name = item
                .get("name")
                .and_then(Value::literal)
                .unwrap_or_else(|| panic!("env entry without literal name: {item:?}"));
            let value = item
                .get("value")
                .or_else(|| item.get("secureValue"))
                .unwrap_or_else(|| panic!("{name} has no value"));
            (name.to_owned(), value.clone())
        })
        .collect()
}

/// The one container of a group body's `properties`.
fn only_container(properties: &Value) -> &Value {
    let containers = properties.at(&["containers"]).items();
    assert_eq!(containers.len(), 1, "one container per group");
    &containers[0]
}

/// `entryNames` in keyvault.bicep: environment variable -> Key Vault entry name.
fn vault_entry_names() -> BTreeMap<String, String> {
    let bicep = Bicep::load("infra/modules/keyvault.bicep");
    match bicep.var("entryNames") {
        Value::Object(entries) => entries
            .iter()
            .map(|(k, v)| {
                let name = v.literal().expect("literal entry name");
                (k.clone(), name.to_owned())
            })
            .collect(),
        other => panic!("entryNames is not an object: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The checks.

#[test]
fn every_container_variable_is_read_by_the_binary_or_passed_to_handlers() {
    let binary = binary_env_vars();
    let entries = container_env_entries();
    let files: BTreeSet<&str> = entries.iter().map(|e| e.file.as_str()).collect();
    assert!(
        files.contains("infra/modules/container-group.bicep")
            && files.contains("infra/aci/logic-app-trigger.bicep"),
        "environment variables found only in {files:?}"
    );
    for pass in HANDLER_PASS_THROUGH {
        assert!(
            !binary.contains_key(*pass),
            "{pass} is read by the binary now: take it off HANDLER_PASS_THROUGH"
        );
    }
    for entry in &entries {
        let known =
            binary.contains_key(&entry.name) || HANDLER_PASS_THROUGH.contains(&entry.name.as_str());
        assert!(
            known,
            "{}: sets {} on the container, but `worker env-vars` does not list it and it is no handler pass-through variable",
            entry.file, entry.name
        );
        assert!(
            entry.value.is_some() != entry.secure_value.is_some(),
            "{}: {} needs exactly one of value / secureValue",
            entry.file,
            entry.name
        );
        let secret = binary.get(&entry.name).is_some_and(|v| v.secret)
            || HANDLER_PASS_THROUGH.contains(&entry.name.as_str());
        if secret {
            assert!(
                entry.secure_value.is_some(),
                "{}: {} is a secret and must be a secureValue",
                entry.file,
                entry.name
            );
        }
    }
}

#[test]
fn logic_app_passes_the_message_text_as_task_data() {
    let entries = container_env_entries();
    let task_data: Vec<&EnvEntry> = entries
        .iter()
        .filter(|e| e.file == "infra/aci/logic-app-trigger.bicep" && e.name == "TASK_DATA")
        .collect();
    assert_eq!(
        task_data.len(),
        1,
        "the Logic App sets TASK_DATA once: {task_data:?}"
    );
    // A secure value: a plain one is returned by every read of the group, so
    // Reader on the resource group would read every task's payload.
    assert_eq!(
        task_data[0].secure_value.as_ref().and_then(Value::literal),
        Some(MESSAGE_TEXT_EXPRESSION),
        "TASK_DATA must be the raw message text, as a secureValue"
    );

    // The manual template passes its taskData parameter the same way.
    let group = Bicep::load("infra/modules/container-group.bicep");
    let direct: Vec<&EnvEntry> = entries
        .iter()
        .filter(|e| e.file == "infra/modules/container-group.bicep" && e.name == "TASK_DATA")
        .collect();
    assert_eq!(direct.len(), 1);
    assert_eq!(direct[0].secure_value, Some(Value::Expr("taskData".into())));
    assert!(group.params.contains_key("taskData"));
    for file in [
        "infra/modules/container-group.bicep",
        "infra/aci/worker-container.bicep",
    ] {
        assert!(
            param_is_secure(file, "taskData"),
            "{file}: param taskData must be @secure()"
        );
    }

    // One run per message, and the message is what the trigger hands over.
    let definition = trigger_definition();
    let trigger = definition.at(&["triggers", "When_there_are_messages_in_a_queue"]);
    assert_eq!(
        trigger.get("splitOn").and_then(Value::literal),
        Some("@triggerBody()?['QueueMessagesList']?['QueueMessage']")
    );
    assert_eq!(
        trigger.at(&["recurrence", "frequency"]).literal(),
        Some("Second")
    );
}

#[test]
fn queue_names_follow_the_worker_convention() {
    // The binary documents its names with a <client> placeholder.
    let help = format!(
        "{}\n{}\n{}",
        binary_help(&[]),
        binary_help(&["poison"]),
        binary_help(&["poison", "list"])
    );
    for name in [
        "<client>-tasks",
        "<client>-tasks-poison",
        "<client>-webhooks",
        "<client>-webhooks-poison",
    ] {
        assert!(
            help.contains(name),
            "`worker --help` no longer names {name}:\n{help}"
        );
    }
    let as_template = |s: &str| s.replace("<client>", "${client}");
    let tasks = as_template("<client>-tasks");
    let poison = as_template("<client>-tasks-poison");

    let storage = Bicep::load("infra/modules/storage.bicep");
    assert_eq!(
        storage.var("tasksQueueName").template(),
        Some(tasks.as_str())
    );
    assert_eq!(
        storage.var("poisonQueueName").template(),
        Some(poison.as_str())
    );
    assert_eq!(
        storage.var("webhooksQueueName").template(),
        Some(as_template("<client>-webhooks").as_str())
    );
    assert_eq!(
        storage.var("webhooksPoisonQueueName").template(),
        Some(as_template("<client>-webhooks-poison").as_str())
    );
    let queues: BTreeSet<String> = storage
        .resources_of("Microsoft.Storage/storageAccounts/queueServices/queues")
        .iter()
        .map(|q| match q.body.get("name") {
            Some(Value::Expr(name)) => name.clone(),
            other => panic!("queue name is not a var: {other:?}"),
        })
        .collect();
    assert_eq!(
        queues,
        BTreeSet::from(
            [
                "tasksQueueName",
                "poisonQueueName",
                "webhooksQueueName",
                "webhooksPoisonQueueName"
            ]
            .map(str::to_owned)
        ),
        "the deployment creates the task queues and the webhook outbox with its poison queue"
    );

    let logic = Bicep::load("infra/aci/logic-app-trigger.bicep");
    assert_eq!(logic.var("tasksQueueName").template(), Some(tasks.as_str()));
    assert_eq!(
        logic.var("poisonQueueName").template(),
        Some(poison.as_str())
    );
    let definition = trigger_definition();
    let trigger_path = definition
        .at(&[
            "triggers",
            "When_there_are_messages_in_a_queue",
            "inputs",
            "path",
        ])
        .template()
        .expect("trigger path");
    assert!(
        trigger_path.contains("${tasksQueueName}"),
        "trigger reads {trigger_path}"
    );
}

#[test]
fn restart_policy_sizes_and_timeout_are_the_documented_defaults() {
    let binary = binary_env_vars();
    let timeout: i64 = binary["WORKER_TASK_TIMEOUT"]
        .default
        .as_deref()
        .and_then(|d| d.parse().ok())
        .expect("WORKER_TASK_TIMEOUT default");

    for file in [
        "infra/aci/main.bicep",
        "infra/aci/worker-container.bicep",
        "infra/aci/logic-app-trigger.bicep",
        "infra/modules/container-group.bicep",
    ] {
        let bicep = Bicep::load(file);
        assert_eq!(
            bicep.param_default("cpuCores").literal(),
            Some(DOCUMENTED_CPU_CORES),
            "{file}: cpuCores"
        );
        assert_eq!(
            bicep.param_default("memoryInGb").literal(),
            Some(DOCUMENTED_MEMORY_GB),
            "{file}: memoryInGb"
        );
        assert_eq!(
            bicep.param_default("taskTimeoutSeconds"),
            &Value::Num(timeout),
            "{file}: taskTimeoutSeconds vs the binary's default"
        );
    }

    let group = Bicep::load("infra/modules/container-group.bicep");
    let resources = group.resources_of("Microsoft.ContainerInstance/containerGroups");
    assert_eq!(resources.len(), 1);
    let created = [
        resources[0].body.at(&["properties"]).clone(),
        trigger_definition()
            .action("Create_group")
            .at(&["inputs", "body", "properties"])
            .clone(),
        workflow_definition("deliver")
            .action("Create_deliver_group")
            .at(&["inputs", "body", "properties"])
            .clone(),
    ];
    for properties in &created {
        assert_eq!(
            properties.get("restartPolicy").and_then(Value::literal),
            Some("Never")
        );
        let containers = properties.at(&["containers"]).items();
        assert_eq!(containers.len(), 1, "one container per task");
        let requests = containers[0].at(&["properties", "resources", "requests"]);
        assert_eq!(
            requests.get("cpu"),
            Some(&Value::Expr("json(cpuCores)".into()))
        );
        assert_eq!(
            requests.get("memoryInGB"),
            Some(&Value::Expr("json(memoryInGb)".into()))
        );
    }

    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/aci/README.md"))
            .expect("infra/aci/README.md");
    assert!(
        readme.contains(DOCUMENTED_SIZE_TEXT),
        "README no longer documents {DOCUMENTED_SIZE_TEXT}"
    );
}

#[test]
fn key_vault_entry_names_map_environment_variables() {
    let binary = binary_env_vars();
    let names = vault_entry_names();
    assert_eq!(
        names
            .get("AZURE_STORAGE_CONNECTION_STRING")
            .map(String::as_str),
        Some("AZURE-STORAGE-CONNECTION-STRING")
    );
    for (env, entry) in &names {
        assert_eq!(*entry, env.replace('_', "-"), "entry name of {env}");
        assert!(
            !entry.is_empty()
                && entry.len() <= 127
                && entry.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{entry} is no valid Key Vault secret name"
        );
        let read = binary.get(env).is_some_and(|v| v.secret);
        assert!(
            read || HANDLER_PASS_THROUGH.contains(&env.as_str()),
            "{env} is in the vault but is neither a secret the binary reads nor a handler pass-through variable"
        );
    }
    // Every secret the binary reads has a vault entry, except the pop
    // receipt: one per message, handed over by the trigger, never stored.
    for (env, var) in &binary {
        let per_message = MESSAGE_COORDINATES.iter().any(|(v, _)| v == env);
        if var.secret && !per_message {
            assert!(
                names.contains_key(env),
                "the binary reads secret {env}, but the vault has no entry for it"
            );
        }
    }

    // The vault stores each entry under exactly that name.
    let vault = Bicep::load("infra/modules/keyvault.bicep");
    let stored: BTreeSet<String> = vault
        .resources_of("Microsoft.KeyVault/vaults/secrets")
        .iter()
        .map(|s| match s.body.get("name") {
            Some(Value::Expr(e)) => e
                .strip_prefix("entryNames.")
                .expect("name from entryNames")
                .to_owned(),
            other => panic!("secret name is not taken from entryNames: {other:?}"),
        })
        .collect();
    assert_eq!(stored, names.keys().cloned().collect());

    // main.bicep hands the mapping to the Logic App.
    let main = Bicep::load("infra/aci/main.bicep");
    assert_eq!(
        main.module("logic-app-trigger.bicep")
            .body
            .at(&["params", "vaultEntryNames"]),
        &Value::Expr("keyVault.outputs.entryNames".into())
    );

    // Each workflow that creates groups reads each secure variable from the
    // entry of the same name, with an action of its own.
    for workflow in ["trigger", "deliver"] {
        let definition = workflow_definition(workflow);
        let mut lists = Vec::new();
        definition.find_all("environmentVariables", &mut lists);
        assert!(!lists.is_empty(), "workflow {workflow} creates no group");
        let mut fetched = 0;
        for item in lists.iter().flat_map(|l| l.items()) {
            let name = item.at(&["name"]).literal().expect("literal name");
            let Some(secure) = item.get("secureValue") else {
                continue;
            };
            // The message's coordinates are secure too, but come from the
            // trigger (checked in logic_app_hands_the_message_to_the_group).
            if MESSAGE_COORDINATES.iter().any(|(var, _)| *var == name) || name == "TASK_DATA" {
                continue;
            }
            let action = format!("Get_{name}");
            assert_eq!(
                secure.literal(),
                Some(format!("@{{body('{action}')?['value']}}").as_str()),
                "{workflow}: {name} must come from action {action}"
            );
            let uri = definition
                .action(&action)
                .at(&["inputs", "uri"])
                .template()
                .expect("uri")
                .to_owned();
            assert!(
                uri.contains(&format!("secrets/${{vaultEntryNames.{name}}}?")),
                "{workflow}: {action} reads {uri}"
            );
            assert!(names.contains_key(name), "{name} has no vault entry");
            fetched += 1;
        }
        assert!(fetched >= 1, "workflow {workflow} fetches no secret at all");
    }

    // The manual template reads the same entries for the same variables.
    let entries = container_env_entries();
    let manual = Bicep::load("infra/aci/worker-container.bicep");
    let params = manual
        .module("../modules/container-group.bicep")
        .body
        .at(&["params"]);
    let mut checked = 0;
    for entry in entries
        .iter()
        .filter(|e| e.file == "infra/modules/container-group.bicep")
    {
        let Some(Value::Expr(param)) = &entry.secure_value else {
            continue;
        };
        // The task itself is secure too, but is the caller's, not the vault's.
        if entry.name == "TASK_DATA" {
            continue;
        }
        let passed = params
            .get(param)
            .unwrap_or_else(|| panic!("worker-container.bicep passes no `{param}`"));
        let Value::Expr(call) = passed else {
            panic!("{param} is not read from the vault: {passed:?}")
        };
        let expected = format!("vault.getSecret('{}')", names[&entry.name]);
        assert_eq!(*call, expected, "{} in worker-container.bicep", entry.name);
        checked += 1;
    }
    assert!(
        checked >= 1,
        "worker-container.bicep reads no secret from the vault"
    );
}

/// What the task containers need to write an undelivered webhook to the
/// outbox themselves: the client, the storage account and the client id of
/// their user-assigned identity (Entra ID; no storage key in a task group).
const OUTBOX_WRITER_ENV: &[(&str, &str)] = &[
    ("WORKER_CLIENT", "client"),
    ("AZURE_STORAGE_ACCOUNT", "storageAccountName"),
    ("AZURE_CLIENT_ID", "identityClientId"),
];

/// The image's entrypoint (Dockerfile); ACI's `command` replaces it.
const IMAGE_BINARY: &str = "/usr/local/bin/worker";

#[test]
fn task_containers_can_write_the_webhook_outbox() {
    let binary = binary_env_vars();
    for (var, _) in OUTBOX_WRITER_ENV {
        assert!(
            binary.get(*var).is_some_and(|v| !v.secret),
            "`worker env-vars` lists no plain {var}"
        );
    }
    let group = Bicep::load("infra/modules/container-group.bicep");
    let groups = group.resources_of("Microsoft.ContainerInstance/containerGroups");
    let bodies = [
        (
            "infra/modules/container-group.bicep",
            groups[0].body.clone(),
        ),
        (
            "infra/aci/logic-app-trigger.bicep Create_group",
            trigger_definition()
                .action("Create_group")
                .at(&["inputs", "body"])
                .clone(),
        ),
    ];
    for (what, body) in &bodies {
        let env = env_map(
            only_container(body.at(&["properties"])).at(&["properties", "environmentVariables"]),
        );
        for (var, expr) in OUTBOX_WRITER_ENV {
            assert_eq!(
                env.get(*var),
                Some(&Value::Expr((*expr).into())),
                "{what}: {var} must be `{expr}`"
            );
        }
        for absent in [
            "AZURE_STORAGE_CONNECTION_STRING",
            "AZURE_STORAGE_QUEUE_ENDPOINT",
        ] {
            assert!(
                !env.contains_key(absent),
                "{what}: the container reaches the outbox with its identity; {absent} must not be set"
            );
        }
        // AZURE_CLIENT_ID selects the identity the group carries.
        let identity = body.at(&["identity"]);
        assert_eq!(identity.at(&["type"]).literal(), Some("UserAssigned"));
        assert!(
            identity
                .at(&["userAssignedIdentities"])
                .get("${identityId}")
                .is_some(),
            "{what}: the group carries the worker identity"
        );
    }
    for param in ["identityClientId", "client", "storageAccountName"] {
        assert!(
            group.params.contains_key(param),
            "container-group.bicep: no `{param}`"
        );
    }

    // The manual template fills them from the same identity and account.
    let manual = Bicep::load("infra/aci/worker-container.bicep");
    let params = manual
        .module("../modules/container-group.bicep")
        .body
        .at(&["params"]);
    for (param, expr) in [
        ("identityClientId", "identity.properties.clientId"),
        ("identityId", "identity.id"),
        ("client", "client"),
        ("storageAccountName", "storageAccountName"),
    ] {
        assert_eq!(
            params.get(param),
            Some(&Value::Expr(expr.into())),
            "worker-container.bicep passes {param}"
        );
    }

    // main.bicep: the identity's client id and the account reach the Logic
    // App, and the identity may write (and create) the outbox queues.
    let main = Bicep::load("infra/aci/main.bicep");
    let logic = main.module("logic-app-trigger.bicep").body.at(&["params"]);
    for (param, expr) in [
        ("identityClientId", "identity.outputs.clientId"),
        ("identityId", "identity.outputs.id"),
        ("storageAccountName", "storage.outputs.accountName"),
    ] {
        assert_eq!(
            logic.get(param),
            Some(&Value::Expr(expr.into())),
            "main.bicep passes {param} to the Logic App"
        );
    }
    let granted = main
        .module("../modules/storage.bicep")
        .body
        .at(&["params", "dataContributorPrincipalIds"])
        .items();
    assert!(
        granted.contains(&Value::Expr("identity.outputs.principalId".into())),
        "the worker identity needs Storage Queue and Blob Data Contributor to write the outbox"
    );
}

/// The outbox keeps outcomes too large for a queue message as blobs in the
/// same account, so whoever gets the queue role gets the blob role too.
#[test]
fn the_worker_identity_may_use_the_outbox_queues_and_its_blobs() {
    let storage = Bicep::load("infra/modules/storage.bicep");
    let mut roles: Vec<(String, String)> = storage
        .resources_of("Microsoft.Authorization/roleAssignments")
        .into_iter()
        .map(|r| {
            let role = match r.body.at(&["properties", "roleDefinitionId"]) {
                Value::Expr(e) => e.clone(),
                other => panic!("role {other:?}"),
            };
            let principal = match r.body.at(&["properties", "principalId"]) {
                Value::Expr(e) => e.clone(),
                other => panic!("principal {other:?}"),
            };
            (role, principal)
        })
        .collect();
    roles.sort();
    let by_id = |var: &str| {
        format!("subscriptionResourceId('Microsoft.Authorization/roleDefinitions', {var})")
    };
    assert_eq!(
        roles,
        vec![
            (by_id("blobDataContributorRoleId"), "principalId".to_owned()),
            (
                by_id("queueDataContributorRoleId"),
                "principalId".to_owned()
            ),
        ]
    );
    // Storage Blob Data Contributor and Storage Queue Data Contributor.
    assert_eq!(
        storage.var("blobDataContributorRoleId").literal(),
        Some("ba92f5b4-2d11-453d-a403-e96b0029c9fe")
    );
    assert_eq!(
        storage.var("queueDataContributorRoleId").literal(),
        Some("974c5e8b-45b9-4653-ba55-5f855dd0fb88")
    );
}

#[test]
fn deliver_workflow_peeks_the_outbox_and_starts_worker_deliver() {
    let help = binary_help(&["deliver"]);
    assert!(
        help.contains("<client>-webhooks") && help.contains("--exit-when-empty"),
        "`worker deliver --help` no longer offers --exit-when-empty on <client>-webhooks:\n{help}"
    );
    let logic = Bicep::load("infra/aci/logic-app-trigger.bicep");
    assert_eq!(
        logic.var("webhooksQueueName").template(),
        Some("${client}-webhooks")
    );
    let definition = workflow_definition("deliver");

    // A recurrence, never two runs at once.
    let triggers = match definition.at(&["triggers"]) {
        Value::Object(t) => t.clone(),
        other => panic!("triggers: {other:?}"),
    };
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0].1;
    assert_eq!(trigger.at(&["type"]).literal(), Some("Recurrence"));
    assert_eq!(
        trigger.at(&["recurrence", "interval"]),
        &Value::Expr("deliverIntervalMinutes".into())
    );
    assert_eq!(
        trigger.at(&["recurrence", "frequency"]).literal(),
        Some("Minute")
    );
    assert_eq!(
        trigger.at(&["runtimeConfiguration", "concurrency", "runs"]),
        &Value::Num(1)
    );
    assert!(logic.param_min("deliverIntervalMinutes") >= 1);

    // Peek (no dequeue, no visibility change) at one visible entry of the
    // outbox, with the workflow identity.
    let peek = definition.action("Peek_outbox");
    assert_eq!(peek.at(&["type"]).literal(), Some("Http"));
    assert_eq!(peek.at(&["inputs", "method"]).literal(), Some("GET"));
    assert_eq!(
        peek.at(&["inputs", "uri"]).template(),
        Some(
            "${storage.properties.primaryEndpoints.queue}${webhooksQueueName}/messages?peekonly=true&numofmessages=1"
        )
    );
    assert_eq!(
        resolve(&logic, peek.at(&["inputs", "headers"])).at(&["x-ms-version"]),
        &Value::Expr("queueApiVersion".into())
    );
    let version = logic
        .var("queueApiVersion")
        .literal()
        .expect("literal version");
    assert!(
        version.len() == 10 && version.as_bytes()[4] == b'-',
        "x-ms-version {version} is a yyyy-mm-dd date"
    );
    assert_eq!(
        peek.at(&["inputs", "authentication"]),
        &Value::Expr("storageAuth".into())
    );
    let auth = logic.var("storageAuth");
    assert_eq!(auth.at(&["type"]).literal(), Some("ManagedServiceIdentity"));
    assert_eq!(
        auth.at(&["audience"]).literal(),
        Some("https://storage.azure.com/")
    );

    // 200 with a message: due; 404: the outbox does not exist, nothing to do;
    // anything else fails the run.
    let route = definition.action("Route_peek");
    assert!(route
        .at(&["runAfter", "Peek_outbox"])
        .items()
        .contains(&Value::Str {
            text: "Failed".into(),
            interpolated: false
        }));
    let cases = match route.at(&["cases"]) {
        Value::Object(c) => c.clone(),
        other => panic!("cases: {other:?}"),
    };
    let case = |code: i64| {
        cases
            .iter()
            .map(|(_, c)| c)
            .find(|c| c.at(&["case"]) == &Value::Num(code))
            .unwrap_or_else(|| panic!("Route_peek has no case {code}"))
    };
    let mut marks = Vec::new();
    case(200).find_all("Mark_due", &mut marks);
    assert_eq!(marks.len(), 1, "a peeked message marks the outbox due");
    let peeked = format!("{:?}", case(200));
    assert!(
        peeked.contains("'<QueueMessage>'"),
        "the 200 case counts peeked messages"
    );
    assert_eq!(
        case(404).at(&["actions"]),
        &Value::Object(Vec::new()),
        "a missing outbox means nothing to deliver"
    );
    let mut fails = Vec::new();
    route.at(&["default"]).find_all("runStatus", &mut fails);
    assert_eq!(fails.len(), 1, "an unreadable outbox fails the run");

    // The group: same image, identity, registry credentials and size as a
    // task group, restart policy Never, running `worker deliver --exit-when-empty`.
    assert_eq!(
        logic.var("deliverGroupName").template(),
        Some("${client}-webhooks-deliver")
    );
    let create = definition.action("Create_deliver_group");
    assert_eq!(create.at(&["inputs", "method"]).literal(), Some("PUT"));
    assert!(create
        .at(&["inputs", "uri"])
        .template()
        .is_some_and(|u| u.contains("/${deliverGroupName}?")));
    let deliver_body = create.at(&["inputs", "body"]);
    let task_body = trigger_definition()
        .action("Create_group")
        .at(&["inputs", "body"])
        .clone();
    for key in ["location", "identity"] {
        assert_eq!(deliver_body.at(&[key]), task_body.at(&[key]), "{key}");
    }
    for key in [
        "osType",
        "sku",
        "restartPolicy",
        "imageRegistryCredentials",
        "diagnostics",
    ] {
        assert_eq!(
            deliver_body.at(&["properties", key]),
            task_body.at(&["properties", key]),
            "properties.{key}"
        );
    }
    let deliver_container = only_container(deliver_body.at(&["properties"]));
    let task_container = only_container(task_body.at(&["properties"]));
    for key in ["image", "resources"] {
        assert_eq!(
            deliver_container.at(&["properties", key]),
            task_container.at(&["properties", key]),
            "container {key}"
        );
    }
    let command: Vec<&str> = deliver_container
        .at(&["properties", "command"])
        .items()
        .iter()
        .map(|c| c.literal().expect("literal command"))
        .collect();
    assert_eq!(command, [IMAGE_BINARY, "deliver", "--exit-when-empty"]);
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .expect("Dockerfile");
    assert!(
        dockerfile.contains(&format!("ENTRYPOINT [\"{IMAGE_BINARY}\"]")),
        "the image's binary is no longer {IMAGE_BINARY}"
    );

    // Its environment is the task group's without the task: the same client,
    // account, identity and webhook settings, and the signing secret.
    let deliver_env = env_map(deliver_container.at(&["properties", "environmentVariables"]));
    let task_env = env_map(task_container.at(&["properties", "environmentVariables"]));
    assert!(!deliver_env.contains_key("TASK_DATA"));
    for (name, value) in &deliver_env {
        assert_eq!(
            task_env.get(name),
            Some(value),
            "the deliver group sets {name} as the task groups do"
        );
    }
    for name in task_env.keys() {
        let needed = name.starts_with("WORKER_WEBHOOK_")
            || OUTBOX_WRITER_ENV.iter().any(|(v, _)| v == name)
            || name == "WORKER_LOG_FORMAT";
        if needed {
            assert!(
                deliver_env.contains_key(name),
                "the deliver group lacks {name}"
            );
        }
    }
    assert!(deliver_env.contains_key("WORKER_WEBHOOK_SECRET"));

    // Secrets stay out of the run history; tags let the cleanup workflow
    // find the group, and mark it as the deliver group.
    assert_eq!(
        create.at(&["runtimeConfiguration"]),
        &Value::Expr("secureInputsAndOutputs".into())
    );
    let tags = create.at(&["inputs", "body", "tags"]).clone();
    let Value::Expr(tags) = tags else {
        panic!("tags are not union(workerTags, ...): {tags:?}")
    };
    assert!(
        tags.starts_with("union(workerTags,") && tags.contains("'worker-role': 'deliver'"),
        "deliver group tags: {tags}"
    );
    let worker_tags = logic.var("workerTags");
    assert_eq!(
        worker_tags.at(&["managed-by"]).literal(),
        Some("worker-task")
    );
    let cleanup_filter = workflow_definition("cleanup")
        .action("Worker_groups")
        .at(&["inputs", "where"])
        .template()
        .expect("where")
        .to_owned();
    assert!(
        cleanup_filter.contains("'managed-by'], 'worker-task')")
            && cleanup_filter.contains("'worker-client'], '${client}')"),
        "the cleanup workflow no longer selects groups tagged like the deliver group: {cleanup_filter}"
    );

    // A finished deliver group is deleted before the next one starts, and
    // only a group tagged as the deliver group.
    let delete = definition.action("Delete_finished_deliver_group");
    assert_eq!(delete.at(&["inputs", "method"]).literal(), Some("DELETE"));
    assert!(format!("{:?}", definition.action("Is_deliver_group")).contains("worker-role"));

    // Roles of the deliver workflow: the launcher role, read access to the
    // outbox queue only, and the webhook secret only.
    let assignments: Vec<&Resource> = logic
        .resources_of("Microsoft.Authorization/roleAssignments")
        .into_iter()
        .filter(|r| {
            r.body.at(&["properties", "principalId"])
                == &Value::Expr("deliver.identity.principalId".into())
        })
        .collect();
    let grants: BTreeSet<(String, String)> = assignments
        .iter()
        .map(|r| {
            let scope = match r.body.get("scope") {
                Some(Value::Expr(s)) => s.clone(),
                None => "resourceGroup".into(),
                other => panic!("scope {other:?}"),
            };
            let role = match r.body.at(&["properties", "roleDefinitionId"]) {
                Value::Expr(e) => e.clone(),
                other => panic!("role {other:?}"),
            };
            (scope, role)
        })
        .collect();
    let by_id = |var: &str| {
        format!("subscriptionResourceId('Microsoft.Authorization/roleDefinitions', {var})")
    };
    assert_eq!(
        grants,
        BTreeSet::from([
            ("resourceGroup".to_owned(), "launcherRole.id".to_owned()),
            ("outboxQueue".to_owned(), by_id("queueDataReaderRoleId")),
            ("webhookSecretEntry".to_owned(), by_id("secretsUserRoleId")),
            ("workerIdentity".to_owned(), by_id("identityOperatorRoleId")),
        ])
    );
    // Storage Queue Data Reader (read and peek messages).
    assert_eq!(
        logic.var("queueDataReaderRoleId").literal(),
        Some("19e7f393-937e-4f77-808e-94535e297925")
    );
    let outbox = logic
        .resources
        .iter()
        .find(|r| r.symbol == "outboxQueue")
        .expect("resource outboxQueue");
    assert!(outbox.existing);
    assert_eq!(
        outbox.body.get("name"),
        Some(&Value::Expr("webhooksQueueName".into()))
    );
    let secret = logic
        .resources
        .iter()
        .find(|r| r.symbol == "webhookSecretEntry")
        .expect("resource webhookSecretEntry");
    assert_eq!(
        secret.body.get("name"),
        Some(&Value::Expr("vaultEntryNames.WORKER_WEBHOOK_SECRET".into()))
    );

    // main.bicep wires the interval through.
    let main = Bicep::load("infra/aci/main.bicep");
    assert_eq!(
        main.module("logic-app-trigger.bicep")
            .body
            .at(&["params", "deliverIntervalMinutes"]),
        &Value::Expr("deliverIntervalMinutes".into())
    );
    assert_eq!(
        main.param_int_default("deliverIntervalMinutes"),
        logic.param_int_default("deliverIntervalMinutes")
    );
}

#[test]
fn client_names_fit_the_binarys_limit() {
    // The binary names its limit when a client name is too long.
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["--client", &"c".repeat(64), "check"])
        .output()
        .expect("run `worker check`");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let limit: i64 = text
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("`worker check` does not state the client name limit:\n{text}"));
    assert!(limit >= 2, "limit {limit}");
    for file in FILES {
        let bicep = Bicep::load(file);
        if !bicep.params.contains_key("client") {
            continue;
        }
        let max = match bicep
            .param_decorators
            .get("client")
            .and_then(|d| d.get("maxLength"))
        {
            Some(Value::Num(n)) => *n,
            other => panic!("{file}: param `client` has no numeric @maxLength ({other:?})"),
        };
        assert!(
            max <= limit,
            "{file}: client may be {max} characters, the binary accepts at most {limit}"
        );
    }
}

// ---------------------------------------------------------------------------
// The message hand-over (infra/aci): the queue message of a task started on
// ACI stays in the queue until the worker inside the group has settled it.

const LOGIC_APP: &str = "infra/aci/logic-app-trigger.bicep";

/// What the trigger hands a task group next to TASK_DATA: the coordinates of
/// the message, so the worker can take its lease over and settle it. Secure
/// values all: the pop receipt is a handle on the message, and a plain value
/// is returned by every read of the group.
const MESSAGE_COORDINATES: &[(&str, &str)] = &[
    ("WORKER_MESSAGE_ID", "@{triggerBody()?['MessageId']}"),
    ("WORKER_POP_RECEIPT", "@{triggerBody()?['PopReceipt']}"),
    ("WORKER_DEQUEUE_COUNT", "@{outputs('Message')?['attempt']}"),
];

/// Outcomes of a trigger run that leave the message for a later run (it
/// comes back after the visibility timeout, one more delivery).
const TRANSIENT_OUTCOMES: &[&str] = &[
    "LookupFailed",
    "SecretsFailed",
    "DeleteFailed",
    "CreateFailed",
    "Late",
];

/// Outcomes that leave the message to a worker: an attempt was started, or
/// one is still running.
const HANDED_OVER_OUTCOMES: &[&str] = &["Started", "Waiting"];

/// Every named action under an `actions` object, at any depth (scopes,
/// branches, cases), in no particular order.
fn actions_in(actions: &Value, out: &mut Vec<(String, Value)>) {
    let Value::Object(entries) = actions else {
        panic!("actions is not an object: {actions:?}")
    };
    for (name, action) in entries {
        out.push((name.clone(), action.clone()));
        if let Some(inner) = action.get("actions") {
            actions_in(inner, out);
        }
        if let Some(inner) = action.get("else").and_then(|e| e.get("actions")) {
            actions_in(inner, out);
        }
        if let Some(Value::Object(cases)) = action.get("cases") {
            for (_, case) in cases {
                actions_in(case.at(&["actions"]), out);
            }
        }
        if let Some(inner) = action.get("default").and_then(|d| d.get("actions")) {
            actions_in(inner, out);
        }
    }
}

fn action_names(actions: &Value) -> BTreeSet<String> {
    let mut all = Vec::new();
    actions_in(actions, &mut all);
    all.into_iter().map(|(name, _)| name).collect()
}

/// A var of `bicep` when `v` names one (`inputs: deleteMessageInputs`),
/// otherwise `v` itself.
fn resolve<'a>(bicep: &'a Bicep, v: &'a Value) -> &'a Value {
    match v {
        Value::Expr(name) if bicep.vars.contains_key(name) => resolve(bicep, bicep.var(name)),
        other => other,
    }
}

/// The quoted words of a Logic Apps `createArray('a', 'b')` expression.
fn created_array(expression: &str) -> BTreeSet<String> {
    let inner = expression
        .strip_prefix("@createArray(")
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a createArray: {expression}"));
    inner
        .split(',')
        .map(|w| w.trim().trim_matches('\'').to_owned())
        .collect()
}

/// The value a SetVariable action assigns, as text.
fn assigned(action: &Value) -> String {
    let value = action.at(&["inputs", "value"]);
    match value {
        Value::Bool(b) => b.to_string(),
        other => other
            .template()
            .unwrap_or_else(|| panic!("assigns {other:?}"))
            .to_owned(),
    }
}

#[test]
fn logic_app_hands_the_message_to_the_group() {
    let binary = binary_env_vars();
    let bicep = Bicep::load(LOGIC_APP);
    let definition = trigger_definition();
    let create = definition.action("Create_group");
    let container = only_container(create.at(&["inputs", "body", "properties"]));
    let items = container
        .at(&["properties", "environmentVariables"])
        .items();
    for (var, expression) in MESSAGE_COORDINATES {
        let found: Vec<&Value> = items
            .iter()
            .filter(|i| i.get("name").and_then(Value::literal) == Some(*var))
            .collect();
        assert_eq!(found.len(), 1, "Create_group sets {var} once");
        assert!(
            found[0].get("value").is_none(),
            "{var} must be a secureValue: plain values are returned by every read of the group"
        );
        assert_eq!(
            found[0].get("secureValue").and_then(Value::literal),
            Some(*expression),
            "{var}"
        );
    }
    // The worker's cap is the Logic App's cap.
    let env = env_map(container.at(&["properties", "environmentVariables"]));
    assert_eq!(
        env.get("WORKER_MAX_DEQUEUE_COUNT"),
        Some(&Value::Expr("string(maxDequeueCount)".into()))
    );
    let default_cap: i64 = binary["WORKER_MAX_DEQUEUE_COUNT"]
        .default
        .as_deref()
        .and_then(|d| d.parse().ok())
        .expect("WORKER_MAX_DEQUEUE_COUNT default");
    let main = Bicep::load("infra/aci/main.bicep");
    for file in [&bicep, &main] {
        assert_eq!(
            file.param_int_default("maxDequeueCount"),
            default_cap,
            "{}: maxDequeueCount vs the binary's WORKER_MAX_DEQUEUE_COUNT",
            file.file.display()
        );
        assert!(file.param_min("maxDequeueCount") >= 1);
    }
    let passed = main.module("logic-app-trigger.bicep").body.at(&["params"]);
    for param in ["maxDequeueCount", "visibilityTimeoutSeconds"] {
        assert_eq!(
            passed.get(param),
            Some(&Value::Expr(param.into())),
            "main.bicep passes {param}"
        );
    }

    // The pop receipt stays out of the run history: the create hides its
    // inputs, and the trigger, whose outputs carry every message's receipt,
    // hides its outputs.
    let hidden = bicep.var("secureInputsAndOutputs");
    let parts: Vec<&str> = hidden
        .at(&["secureData", "properties"])
        .items()
        .iter()
        .filter_map(Value::literal)
        .collect();
    assert_eq!(parts, ["inputs", "outputs"]);
    assert_eq!(
        create.at(&["runtimeConfiguration"]),
        &Value::Expr("secureInputsAndOutputs".into())
    );
    assert_eq!(
        definition.at(&[
            "triggers",
            "When_there_are_messages_in_a_queue",
            "runtimeConfiguration",
            "secureData"
        ]),
        hidden.at(&["secureData"]),
        "the queue trigger's outputs hold the task texts and pop receipts"
    );
}

#[test]
fn every_ending_that_owes_a_webhook_is_left_to_the_worker() {
    // The Logic App cannot send the worker's task.failed (the same webhook-id,
    // signed with WORKER_WEBHOOK_SECRET): so no workflow may poison a task
    // message, or delete one, itself. A message that is no valid task, or
    // has had its attempts, goes to a group all the same; the worker there
    // poisons it and sends task.failed (tests/leased.rs).
    let bicep = Bicep::load(LOGIC_APP);
    for workflow in ["trigger", "cleanup", "deliver"] {
        let definition = workflow_definition(workflow);
        let mut all = Vec::new();
        actions_in(definition.at(&["actions"]), &mut all);
        for (name, action) in &all {
            let Some(inputs) = action.get("inputs").map(|i| resolve(&bicep, i)) else {
                continue;
            };
            let text = format!("{inputs:?}");
            let method = inputs
                .get("method")
                .and_then(Value::literal)
                .unwrap_or_default()
                .to_ascii_lowercase();
            let on_a_queue = action.at(&["type"]).literal() == Some("ApiConnection")
                || text.contains("primaryEndpoints.queue");
            assert!(
                !(text.contains("poisonQueueName") || text.contains("-poison")),
                "{workflow}: {name} poisons a message but sends no task.failed webhook (only the worker can, \
                 under the webhook-id every mode uses): hand the message to a group instead; the worker \
                 poisons what is invalid or above WORKER_MAX_DEQUEUE_COUNT and reports it"
            );
            assert!(
                !(on_a_queue && method != "get"),
                "{workflow}: {name} changes a queue ({method}); settling a task message is the worker's \
                 (run, report, then delete / retry / poison)"
            );
        }
    }

    // The trigger hands every message over or leaves it for a later run;
    // its outcomes are handed-over or transient, never a verdict on the task.
    let definition = trigger_definition();
    let init = definition
        .action("Init_outcome")
        .at(&["inputs", "variables"])
        .items()[0]
        .clone();
    assert_eq!(init.at(&["value"]).literal(), Some("LookupFailed"));
    let mut all = Vec::new();
    actions_in(definition.at(&["actions"]), &mut all);
    let mut handed_over = BTreeSet::new();
    for (name, action) in &all {
        if action.at(&["type"]).literal() != Some("SetVariable")
            || action.at(&["inputs", "name"]).literal() != Some("outcome")
        {
            continue;
        }
        let value = assigned(action);
        if value == "@{outputs('Decision')}" || value.contains("'Late'") {
            continue;
        }
        assert!(
            HANDED_OVER_OUTCOMES.contains(&value.as_str())
                || TRANSIENT_OUTCOMES.contains(&value.as_str()),
            "{name} sets outcome {value}, neither handed over nor transient"
        );
        if HANDED_OVER_OUTCOMES.contains(&value.as_str()) {
            handed_over.insert(value);
        }
    }
    assert_eq!(handed_over.len(), HANDED_OVER_OUTCOMES.len());
    assert_eq!(
        definition
            .action("Mark_started")
            .at(&["runAfter", "Create_group"])
            .items(),
        [Value::Str {
            text: "Succeeded".into(),
            interpolated: false
        }]
    );
    // Anything but handed-over ends the run Failed (the alert) and leaves the
    // message; Settle does nothing else.
    let settle = definition.action("Settle");
    let keep_condition = settle.at(&["expression", "and"]).items()[0]
        .at(&["not", "contains"])
        .items()[0]
        .literal()
        .expect("literal list")
        .to_owned();
    assert_eq!(
        created_array(&keep_condition),
        HANDED_OVER_OUTCOMES.iter().map(|o| o.to_string()).collect()
    );
    let mut settled = Vec::new();
    actions_in(settle.at(&["actions"]), &mut settled);
    assert!(settled
        .iter()
        .all(|(_, a)| a.at(&["type"]).literal() == Some("Terminate")));

    // The group can poison: it holds the message, and knows the limit.
    let container =
        only_container(
            definition
                .action("Create_group")
                .at(&["inputs", "body", "properties"]),
        );
    let env = env_map(container.at(&["properties", "environmentVariables"]));
    for var in [
        "WORKER_MESSAGE_ID",
        "WORKER_POP_RECEIPT",
        "WORKER_DEQUEUE_COUNT",
        "WORKER_MAX_DEQUEUE_COUNT",
        "WORKER_CLIENT",
    ] {
        assert!(env.contains_key(var), "the task group lacks {var}");
    }
}

#[test]
fn logic_app_names_groups_by_message_and_counts_deliveries() {
    let definition = trigger_definition();
    let message = definition.action("Message").at(&["inputs"]).clone();
    // One group per message: message ids are unique, task ids may collide
    // after sanitizing, so two valid tasks never share a group name.
    assert_eq!(
        message.at(&["group"]).literal(),
        None,
        "the group name interpolates the client"
    );
    assert_eq!(
        message.at(&["group"]).template(),
        Some("@{concat('${client}-', toLower(triggerBody()?['MessageId']))}")
    );
    // Attempts are the queue's dequeue count, as job mode counts them: they
    // survive the group's deletion and a create that fails after it.
    assert_eq!(
        message.at(&["attempt"]).literal(),
        Some("@int(coalesce(triggerBody()?['DequeueCount'], '1'))")
    );
    for action in ["Look_up_group", "Create_group", "Delete_previous_group"] {
        let uri = definition
            .action(action)
            .at(&["inputs", "uri"])
            .template()
            .expect("uri")
            .to_owned();
        assert!(
            uri.contains("/@{outputs('Message')?['group']}?"),
            "{action} addresses {uri}"
        );
    }
    let Value::Expr(tags) = definition
        .action("Create_group")
        .at(&["inputs", "body", "tags"])
    else {
        panic!("Create_group tags are not union(workerTags, ...)")
    };
    for tag in [
        "'worker-attempt': '@{outputs(\\'Message\\')?[\\'attempt\\']}'",
        "'worker-message-id': '@{outputs(\\'Message\\')?[\\'id\\']}'",
    ] {
        assert!(tags.contains(tag), "Create_group tags lack {tag}: {tags}");
    }

    // Duplicates guard: this message's group is replaced only once it has
    // ended (or never started); running or pending, it is left alone.
    let decision = definition
        .action("Decision")
        .at(&["inputs"])
        .template()
        .expect("Decision")
        .to_owned();
    assert_eq!(
        decision,
        "@if(greaterOrEquals(ticks(utcNow()), ticks(outputs('Message')?['createBy'])), 'Late', if(equals(outputs('Previous')?['status'], 404), 'create', if(not(equals(outputs('Previous')?['status'], 200)), 'LookupFailed', if(or(contains(createArray('Succeeded', 'Failed', 'Stopped'), outputs('Previous')?['state']), equals(outputs('Previous')?['provisioningState'], 'Failed')), 'replace', 'wait'))))"
    );

    // Only Replace deletes a group before the create, and the create runs
    // only when the route said so and the delete (if any) finished.
    let route = definition.action("Route");
    let cases = match route.at(&["cases"]) {
        Value::Object(c) => c.clone(),
        other => panic!("cases: {other:?}"),
    };
    let case_of = |word: &str| {
        cases
            .iter()
            .find(|(_, c)| c.at(&["case"]).literal() == Some(word))
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("Route has no case {word}"))
    };
    assert!(action_names(case_of("replace").at(&["actions"])).contains("Delete_previous_group"));
    let delete = definition.action("Delete_previous_group");
    assert_eq!(delete.at(&["inputs", "method"]).literal(), Some("DELETE"));
    assert!(
        delete.get("operationOptions").is_none(),
        "the delete must finish before the create (async pattern on)"
    );
    assert!(
        delete.get("limit").is_some(),
        "waiting for the delete is bounded"
    );
    let starts: BTreeSet<String> = {
        let mut all = Vec::new();
        actions_in(definition.at(&["actions"]), &mut all);
        all.into_iter()
            .filter(|(_, a)| {
                a.at(&["type"]).literal() == Some("SetVariable")
                    && a.at(&["inputs", "name"]).literal() == Some("start")
            })
            .map(|(n, _)| n)
            .collect()
    };
    assert_eq!(
        starts,
        BTreeSet::from(["Mark_start".to_owned(), "Mark_restart".to_owned()])
    );
    assert!(action_names(case_of("create").at(&["actions"])).contains("Mark_start"));
    assert!(definition
        .action("Mark_restart")
        .at(&["runAfter"])
        .get("Delete_previous_group")
        .is_some());
    assert!(
        action_names(definition.action("Start_attempt").at(&["actions"])).contains("Create_group")
    );
    assert!(format!(
        "{:?}",
        definition.action("Start_attempt").at(&["expression"])
    )
    .contains("variables('start')"));
}

// ---------------------------------------------------------------------------
// Worst case of one trigger run against the visibility timeout.

/// Logic Apps' limit for one outbound request (multi-tenant; "HTTP limits" in
/// learn.microsoft.com/azure/logic-apps/logic-apps-limits-and-config).
const OUTBOUND_REQUEST_SECS: f64 = 120.0;
/// A built-in action without I/O (variables, Compose, conditions).
const BUILTIN_ACTION_SECS: f64 = 1.0;
/// From the receive, which starts the visibility timeout, to the first
/// action of the run.
const RUN_START_ALLOWANCE_SECS: f64 = 60.0;
/// From the create until the worker in the group has taken the lease over:
/// provisioning, the pull of the ~5 MB image, the start (20-60 s usually).
const GROUP_START_ALLOWANCE_SECS: f64 = 300.0;
/// The Default retry policy: up to 4 retries, each pause at most 45 s
/// (learn.microsoft.com/azure/logic-apps/error-exception-handling).
const DEFAULT_RETRIES: f64 = 4.0;
const DEFAULT_MAX_PAUSE_SECS: f64 = 45.0;
/// The exponential policy's default bounds: at least 5 s, at most 1 day.
const EXPONENTIAL_MIN_SECS: f64 = 5.0;
const EXPONENTIAL_MAX_SECS: f64 = 86_400.0;

/// `PT5S`, `PT2M`, `PT1H30M`, `P1D` in seconds.
fn iso_duration_secs(text: &str) -> f64 {
    let rest = text
        .strip_prefix('P')
        .unwrap_or_else(|| panic!("{text} is no ISO 8601 duration"));
    let (days, time) = match rest.split_once('T') {
        Some((d, t)) => (d, t),
        None => (rest, ""),
    };
    let mut secs = 0.0;
    if let Some(d) = days.strip_suffix('D') {
        secs += d.parse::<f64>().expect("days") * 86_400.0;
    }
    let mut number = String::new();
    for c in time.chars() {
        match c {
            'H' | 'M' | 'S' => {
                let n: f64 = number.parse().expect("duration number");
                secs += n * match c {
                    'H' => 3600.0,
                    'M' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            digit => number.push(digit),
        }
    }
    secs
}

/// Finish times of a workflow's actions when every request takes the
/// outbound limit and every retry is used. Branches of a condition or switch
/// are all counted as if each could run, so this is an upper bound.
struct WorstCase<'a> {
    bicep: &'a Bicep,
    finish: BTreeMap<String, f64>,
}

impl WorstCase<'_> {
    fn policy_secs(&self, policy: Option<&Value>) -> f64 {
        let default = (DEFAULT_RETRIES + 1.0) * OUTBOUND_REQUEST_SECS
            + DEFAULT_RETRIES * DEFAULT_MAX_PAUSE_SECS;
        let Some(policy) = policy.map(|p| resolve(self.bicep, p)) else {
            return default;
        };
        let count = match policy.get("count") {
            Some(Value::Num(n)) => *n as f64,
            None => 0.0,
            other => panic!("retry count {other:?}"),
        };
        let secs_of = |key: &str, or: f64| {
            policy
                .get(key)
                .map(|v| iso_duration_secs(v.literal().expect("literal interval")))
                .unwrap_or(or)
        };
        let requests = (count + 1.0) * OUTBOUND_REQUEST_SECS;
        match policy.at(&["type"]).literal().expect("literal retry type") {
            "none" => OUTBOUND_REQUEST_SECS,
            "default" => default,
            "fixed" => requests + count * secs_of("interval", 0.0),
            "exponential" => {
                let interval = secs_of("interval", 0.0);
                let min = secs_of("minimumInterval", EXPONENTIAL_MIN_SECS);
                let max = secs_of("maximumInterval", EXPONENTIAL_MAX_SECS);
                let pauses: f64 = (1..=count as i32)
                    .map(|k| (2f64.powi(k - 1) * interval).min(max).max(min))
                    .sum();
                requests + pauses
            }
            other => panic!("unknown retry policy type {other}"),
        }
    }

    fn request_secs(&self, action: &Value) -> f64 {
        let inputs = resolve(self.bicep, action.at(&["inputs"]));
        let mut secs = match (inputs.get("retryPolicy"), action.get("retryPolicy")) {
            (Some(inside), _) => self.policy_secs(Some(inside)),
            // The documented place is inside `inputs`; beside them the policy
            // may be ignored and the default one applies.
            (None, Some(beside)) => self.policy_secs(Some(beside)).max(self.policy_secs(None)),
            (None, None) => self.policy_secs(None),
        };
        // An asynchronous operation (202) is polled up to limit.timeout.
        if let Some(timeout) = action.get("limit").and_then(|l| l.get("timeout")) {
            secs += iso_duration_secs(timeout.literal().expect("literal timeout"));
        }
        secs
    }

    fn duration(&mut self, action: &Value, begin: f64) -> f64 {
        let branches = |action: &Value| -> Vec<Value> {
            let mut out = Vec::new();
            if let Some(a) = action.get("actions") {
                out.push(a.clone());
            }
            if let Some(a) = action.get("else").and_then(|e| e.get("actions")) {
                out.push(a.clone());
            }
            if let Some(Value::Object(cases)) = action.get("cases") {
                out.extend(cases.iter().map(|(_, c)| c.at(&["actions"]).clone()));
            }
            if let Some(a) = action.get("default").and_then(|d| d.get("actions")) {
                out.push(a.clone());
            }
            out
        };
        match action.at(&["type"]).literal().expect("literal action type") {
            "Http" | "ApiConnection" => self.request_secs(action),
            "Scope" | "If" | "Switch" => {
                let mut end = begin;
                for branch in branches(action) {
                    end = end.max(self.schedule(&branch, begin));
                }
                end - begin + BUILTIN_ACTION_SECS
            }
            "Wait" => {
                let interval = action.at(&["inputs", "interval"]);
                let count = match interval.at(&["count"]) {
                    Value::Num(n) => *n as f64,
                    other => panic!("Wait count {other:?}"),
                };
                count
                    * match interval.at(&["unit"]).literal() {
                        Some("Second") => 1.0,
                        Some("Minute") => 60.0,
                        other => panic!("Wait unit {other:?}"),
                    }
            }
            "Foreach" | "Until" => panic!("loops are not modelled here"),
            _ => BUILTIN_ACTION_SECS,
        }
    }

    /// When the last of `actions` (name -> action, ordered by runAfter)
    /// finishes, if the first may start at `start`.
    fn schedule(&mut self, actions: &Value, start: f64) -> f64 {
        let Value::Object(entries) = actions else {
            panic!("actions is not an object: {actions:?}")
        };
        let mut done: BTreeMap<String, f64> = BTreeMap::new();
        let mut waiting: Vec<&(String, Value)> = entries.iter().collect();
        while !waiting.is_empty() {
            let ready = waiting
                .iter()
                .position(|(_, action)| match action.get("runAfter") {
                    Some(Value::Object(after)) => after.iter().all(|(p, _)| done.contains_key(p)),
                    _ => true,
                })
                .expect("runAfter names an action outside this scope, or a cycle");
            let (name, action) = waiting.remove(ready);
            let begin = match action.get("runAfter") {
                Some(Value::Object(after)) => {
                    after.iter().map(|(p, _)| done[p]).fold(start, f64::max)
                }
                _ => start,
            };
            let end = begin + self.duration(action, begin);
            done.insert(name.clone(), end);
            self.finish.insert(name.clone(), end);
        }
        done.values().copied().fold(start, f64::max)
    }
}

#[test]
fn a_group_is_created_only_while_its_hand_over_fits_the_visibility_timeout() {
    let bicep = Bicep::load(LOGIC_APP);
    let definition = trigger_definition();

    assert_retry_policies_inside_inputs(&bicep, &definition, "trigger");

    let mut worst = WorstCase {
        bicep: &bicep,
        finish: BTreeMap::new(),
    };
    let run = worst.schedule(definition.at(&["actions"]), 0.0);
    let create = worst.request_secs(definition.action("Create_group"));
    let delete = worst.request_secs(definition.action("Delete_previous_group"));
    eprintln!(
        "trigger run, worst case: {run:.0} s in all; the create takes up to {create:.0} s, the delete {delete:.0} s"
    );

    // Runs may wait for a slot (startsPerMinute at once), so a run's start
    // is not bounded; what is bounded is when it may still act. Decision says
    // Late, and Start_attempt creates nothing, from createBy on: the receive
    // time plus the visibility timeout minus handOverMarginSeconds.
    let margin = match bicep.var("handOverMarginSeconds") {
        Value::Num(n) => *n as f64,
        other => panic!("handOverMarginSeconds: {other:?}"),
    };
    assert_eq!(
        definition
            .action("Message")
            .at(&["inputs", "createBy"])
            .template(),
        Some("@{addSeconds(trigger()?['startTime'], ${visibilityTimeoutSeconds - handOverMarginSeconds})}")
    );
    // The create that began just before createBy ends, and its group has
    // started and taken the lease over, before the message can be received
    // again.
    assert!(
        create + GROUP_START_ALLOWANCE_SECS <= margin,
        "handOverMarginSeconds ({margin} s) must cover the create ({create} s) and the group's start ({GROUP_START_ALLOWANCE_SECS} s)"
    );
    // A delete that began just before createBy has ended before another run
    // can receive the message (and create the next group under that name).
    assert!(
        delete < margin,
        "handOverMarginSeconds ({margin} s) must cover deleting the earlier group ({delete} s)"
    );
    let decision = definition
        .action("Decision")
        .at(&["inputs"])
        .template()
        .expect("Decision")
        .to_owned();
    assert!(
        decision.starts_with(
            "@if(greaterOrEquals(ticks(utcNow()), ticks(outputs('Message')?['createBy'])), 'Late'"
        ),
        "Decision must stop a late run before it deletes or creates: {decision}"
    );
    assert!(
        format!(
            "{:?}",
            definition.action("Start_attempt").at(&["expression"])
        )
        .contains("@ticks(outputs('Message')?['createBy'])"),
        "Start_attempt must check createBy again (the delete may have taken long)"
    );
    let main = Bicep::load("infra/aci/main.bicep");
    for file in [&bicep, &main] {
        let shortest = file.param_min("visibilityTimeoutSeconds") as f64;
        // Time left for a typical run to reach the create.
        assert!(
            shortest - margin >= RUN_START_ALLOWANCE_SECS + 600.0,
            "{}: visibilityTimeoutSeconds may be {shortest} s, which leaves a run too little time before createBy",
            file.file.display()
        );
        assert!(file.param_int_default("visibilityTimeoutSeconds") as f64 >= shortest);
    }
    assert_eq!(
        definition.at(&[
            "triggers",
            "When_there_are_messages_in_a_queue",
            "inputs",
            "queries",
            "visibilitytimeout"
        ]),
        &Value::Expr("string(visibilityTimeoutSeconds)".into())
    );

    // The create rate: startsPerMinute runs at once, and a run that tried a
    // create holds its slot for a minute.
    let trigger = definition.at(&["triggers", "When_there_are_messages_in_a_queue"]);
    assert_eq!(
        trigger.at(&["runtimeConfiguration", "concurrency", "runs"]),
        &Value::Expr("startsPerMinute".into())
    );
    let pace = definition.action("Pace");
    assert_eq!(pace.at(&["type"]).literal(), Some("Wait"));
    assert_eq!(pace.at(&["inputs", "interval", "count"]), &Value::Num(60));
    assert_eq!(
        pace.at(&["inputs", "interval", "unit"]).literal(),
        Some("Second")
    );
    assert_eq!(
        pace.at(&["runAfter", "Create_group"]).items().len(),
        3,
        "the slot is held after every create, failed ones included"
    );
}

#[test]
fn cleanup_deletes_every_ended_group_and_keeps_finished_groups_under_the_quota() {
    let bicep = Bicep::load(LOGIC_APP);
    let cleanup = workflow_definition("cleanup");
    let mut all = Vec::new();
    actions_in(cleanup.at(&["actions"]), &mut all);
    let deletes: Vec<&String> = all
        .iter()
        .filter(|(_, a)| {
            a.get("inputs")
                .and_then(|i| i.get("method"))
                .and_then(Value::literal)
                == Some("DELETE")
        })
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        deletes,
        ["Delete_group"],
        "the cleanup deletes in one place"
    );
    let if_delete = cleanup.action("If_delete");
    assert!(action_names(if_delete.at(&["actions"])).contains("Delete_group"));
    assert_eq!(
        if_delete.at(&["expression", "and"]).items()[0]
            .at(&["equals"])
            .items(),
        [
            Value::Str {
                text: "@outputs('Verdict')".into(),
                interpolated: false
            },
            Value::Str {
                text: "delete".into(),
                interpolated: false
            }
        ]
    );

    // The verdict: a group that has not ended is never deleted (at most
    // stopped after maxGroupAgeHours); one that ended is deleted at once
    // (after its abnormal end, if any, was reported: Report_abnormal_end
    // reads the same lookup). Nothing needs it: its output is in Log
    // Analytics, and attempts are the queue's dequeue count.
    let verdict = cleanup
        .action("Verdict")
        .at(&["inputs"])
        .template()
        .expect("Verdict")
        .to_owned();
    let not_ended = verdict
        .strip_prefix("@if(outputs('Ended'), 'delete', ")
        .unwrap_or_else(|| panic!("Verdict is not if(ended, 'delete', ...): {verdict}"));
    assert!(
        !not_ended.contains("'delete'"),
        "a running or pending group is never deleted"
    );
    assert!(not_ended.contains("${maxGroupAgeHours}") && not_ended.contains("'stop'"));
    assert_eq!(
        cleanup.action("Ended").at(&["inputs"]).literal(),
        Some("@or(contains(createArray('Succeeded', 'Failed', 'Stopped'), outputs('Facts')?['state']), equals(outputs('Facts')?['provisioningState'], 'Failed'))")
    );
    let facts = cleanup.action("Facts").at(&["inputs"]).clone();
    assert_eq!(
        facts.at(&["exitCode"]).literal(),
        Some("@coalesce(body('Get_group')?['properties']?['containers']?[0]?['properties']?['instanceView']?['currentState']?['exitCode'], -1)")
    );
    assert_eq!(
        facts.at(&["messageId"]).literal(),
        Some("@{body('Get_group')?['tags']?['worker-message-id']}")
    );

    // Overran groups are stopped, which the launcher role allows.
    let stop = cleanup.action("Stop_group");
    assert_eq!(stop.at(&["inputs", "method"]).literal(), Some("POST"));
    assert!(stop
        .at(&["inputs", "uri"])
        .template()
        .is_some_and(|u| u.contains("/stop?api-version=")));
    let role = bicep
        .resources_of("Microsoft.Authorization/roleDefinitions")
        .into_iter()
        .find(|r| r.symbol == "launcherRole")
        .expect("launcherRole");
    let granted: Vec<&str> = role.body.at(&["properties", "permissions"]).items()[0]
        .at(&["actions"])
        .items()
        .iter()
        .filter_map(Value::literal)
        .collect();
    for action in [
        "Microsoft.ContainerInstance/containerGroups/stop/action",
        "Microsoft.ContainerInstance/containerGroups/delete",
        "Microsoft.ContainerInstance/locations/operationResults/read",
    ] {
        assert!(
            granted.contains(&action),
            "the launcher role lacks {action}"
        );
    }

    // The age limit never stops a task inside its own timeout.
    let binary = binary_env_vars();
    let default_of = |name: &str| -> f64 {
        binary[name]
            .default
            .as_deref()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{name} has no numeric default"))
    };
    let age_limit = bicep.param_int_default("maxGroupAgeHours") as f64 * 3600.0;
    let longest_task = bicep.param_int_default("visibilityTimeoutSeconds") as f64
        + default_of("WORKER_TASK_TIMEOUT")
        + 2.0 * default_of("WORKER_VISIBILITY_TIMEOUT");
    assert!(
        age_limit > longest_task,
        "maxGroupAgeHours would stop tasks within their timeout"
    );

    // Capacity, against ACI's default quotas (infra/aci/README.md, capacity
    // model): at the documented rate, finished groups waiting for the next
    // cleanup run must not fill the group quota, and creates stay inside the
    // create limits.
    let recurrence = cleanup.at(&["triggers", "Every_few_minutes", "recurrence"]);
    assert_eq!(recurrence.at(&["frequency"]).literal(), Some("Minute"));
    assert_eq!(
        recurrence.at(&["interval"]),
        &Value::Expr("cleanupIntervalMinutes".into())
    );
    let trigger_every = bicep.param_int_default("cleanupIntervalMinutes") as f64;
    let starts_per_minute = bicep.param_int_default("startsPerMinute") as f64;
    let deliver_per_hour = 60.0 / bicep.param_int_default("deliverIntervalMinutes") as f64;
    let tasks_per_hour = starts_per_minute * 60.0;
    let finished = starts_per_minute * (trigger_every + CLEANUP_RUN_ALLOWANCE_MINUTES) + 1.0;
    eprintln!(
        "capacity: {tasks_per_hour} tasks per hour; at most {finished} finished groups wait for the cleanup"
    );
    assert!(
        finished <= ACI_GROUP_QUOTA,
        "at {tasks_per_hour} tasks per hour, {trigger_every} min between cleanup runs (+{CLEANUP_RUN_ALLOWANCE_MINUTES} min for a run) leave up to {finished} finished groups, above ACI's quota of {ACI_GROUP_QUOTA}"
    );
    assert!(
        finished <= ACI_GROUP_QUOTA / 2.0,
        "finished groups ({finished}) would take more than half of the quota of {ACI_GROUP_QUOTA} from running ones"
    );
    assert!(
        tasks_per_hour + deliver_per_hour <= ACI_CREATES_PER_HOUR,
        "{tasks_per_hour} task groups and {deliver_per_hour} deliver groups an hour exceed ACI's {ACI_CREATES_PER_HOUR} creates an hour"
    );
    assert!(
        starts_per_minute * 5.0 + 1.0 <= ACI_CREATES_PER_5_MINUTES,
        "creates in 5 minutes exceed ACI's {ACI_CREATES_PER_5_MINUTES}"
    );
    let main = Bicep::load("infra/aci/main.bicep");
    for param in ["cleanupIntervalMinutes", "startsPerMinute"] {
        assert_eq!(
            main.param_int_default(param),
            bicep.param_int_default(param),
            "main.bicep's {param}"
        );
        assert_eq!(
            main.module("logic-app-trigger.bicep")
                .body
                .at(&["params", param]),
            &Value::Expr(param.into()),
            "main.bicep passes {param}"
        );
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/aci/README.md"))
            .expect("infra/aci/README.md");
    for figure in [
        format!("{tasks_per_hour:.0} tasks per hour"),
        format!("{ACI_GROUP_QUOTA:.0} container groups"),
        format!("{ACI_CREATES_PER_HOUR:.0} creates per hour"),
        format!("{ACI_CREATES_PER_5_MINUTES:.0} per 5 minutes"),
        format!("{finished:.0} finished groups"),
    ] {
        assert!(
            readme.contains(&figure),
            "infra/aci/README.md's capacity model does not state `{figure}`"
        );
    }
}

/// ACI's default quotas per subscription and region ("Resource availability
/// and quota limits for ACI", learn.microsoft.com/azure/container-instances/
/// container-instances-resource-and-quota-limits): container groups
/// (Standard SKU), creates an hour and in 5 minutes.
const ACI_GROUP_QUOTA: f64 = 100.0;
const ACI_CREATES_PER_HOUR: f64 = 300.0;
const ACI_CREATES_PER_5_MINUTES: f64 = 100.0;
/// One cleanup run: a list, then one GET per group, five at a time.
const CLEANUP_RUN_ALLOWANCE_MINUTES: f64 = 3.0;

#[test]
fn abnormal_ends_are_reported_and_alerted() {
    let bicep = Bicep::load(LOGIC_APP);
    let tracked = match bicep.var("abnormalEndTracked") {
        Value::Object(entries) => entries.clone(),
        other => panic!("abnormalEndTracked: {other:?}"),
    };
    let keys: Vec<&str> = tracked.iter().map(|(k, _)| k.as_str()).collect();
    for key in [
        "group",
        "exitCode",
        "state",
        "detail",
        "attempt",
        "messageId",
    ] {
        assert!(keys.contains(&key), "abnormalEndTracked lacks {key}");
    }
    for (key, value) in &tracked {
        assert_eq!(
            value.literal(),
            Some(format!("@{{action()['inputs']['{key}']}}").as_str()),
            "tracked property {key} reads the action's own input"
        );
    }
    for (workflow, source) in [("trigger", "Look_up_group"), ("cleanup", "Get_group")] {
        let report = workflow_definition(workflow)
            .action("Report_abnormal_end")
            .clone();
        assert_eq!(report.at(&["type"]).literal(), Some("Compose"));
        assert_eq!(
            report.at(&["trackedProperties"]),
            &Value::Expr("abnormalEndTracked".into())
        );
        let inputs = match report.at(&["inputs"]) {
            Value::Object(e) => e.clone(),
            other => panic!("{workflow}: inputs {other:?}"),
        };
        let input_keys: Vec<&str> = inputs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(input_keys, keys, "{workflow}: Report_abnormal_end inputs");
        let text = format!("{inputs:?}");
        assert!(text.contains(&format!("body('{source}')")));
        assert!(
            !text.contains("triggerBody"),
            "{workflow}: built from the trigger's secure outputs, the report would be hidden"
        );
    }
    // The trigger reports the earlier attempt it replaces unless the worker
    // ended it (exit 0 or 1).
    let trigger = trigger_definition();
    let if_abnormal = trigger.action("If_abnormal_end");
    assert!(action_names(if_abnormal.at(&["actions"])).contains("Report_abnormal_end"));
    assert!(format!("{:?}", if_abnormal.at(&["expression"])).contains("@createArray(0, 1)"));

    // The alert reads what the reports wrote.
    let query = match bicep.var("abnormalEndsQuery") {
        Value::Str { text, .. } => text.clone(),
        Value::Expr(text) => text.clone(),
        other => panic!("abnormalEndsQuery: {other:?}"),
    };
    assert!(query.contains("\"Report_abnormal_end\"") && query.contains("workflowActionCompleted"));
    for key in &keys {
        assert!(
            query.contains(&format!("trackedProperties_{key}_s")),
            "the alert query does not read {key}"
        );
    }
    let rules = bicep.resources_of("Microsoft.Insights/scheduledQueryRules");
    let rule = &rules
        .iter()
        .find(|r| r.symbol == "abnormalEndsAlert")
        .expect("abnormalEndsAlert")
        .body;
    assert_eq!(
        rule.at(&["properties", "scopes"]).items(),
        [Value::Expr("workspace.id".into())]
    );
    let criterion = &rule.at(&["properties", "criteria", "allOf"]).items()[0];
    assert_eq!(
        criterion.at(&["query"]),
        &Value::Expr("abnormalEndsQuery".into())
    );
    assert_eq!(criterion.at(&["threshold"]), &Value::Num(0));
    assert_eq!(
        rule.at(&["properties", "actions", "actionGroups"]).items(),
        [Value::Expr("actionGroupId".into())]
    );
    // Both workflows send their runtime logs to that workspace.
    for symbol in ["triggerDiagnostics", "cleanupDiagnostics"] {
        let settings = bicep
            .resources
            .iter()
            .find(|r| r.symbol == symbol)
            .unwrap_or_else(|| panic!("no {symbol}"));
        assert_eq!(
            settings.body.at(&["properties", "workspaceId"]),
            &Value::Expr("workspace.id".into())
        );
        assert!(format!("{:?}", settings.body).contains("WorkflowRuntime"));
    }
}

#[test]
fn aci_readme_documents_every_parameter_and_the_lifecycle() {
    let main = Bicep::load("infra/aci/main.bicep");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/aci/README.md"))
            .expect("infra/aci/README.md");
    for param in main.params.keys() {
        assert!(
            readme.contains(&format!("`{param}`")),
            "infra/aci/README.md does not document parameter `{param}`"
        );
    }
    let minutes = main.param_int_default("visibilityTimeoutSeconds") / 60;
    for needed in [
        "worker-attempt".to_owned(),
        "worker-message-id".to_owned(),
        "WORKER_POP_RECEIPT".to_owned(),
        "Report_abnormal_end".to_owned(),
        format!("`{}`", main.param_int_default("visibilityTimeoutSeconds")),
        format!("{minutes} min"),
    ] {
        assert!(
            readme.contains(&needed),
            "infra/aci/README.md does not mention {needed}"
        );
    }
}

// ---------------------------------------------------------------------------
// The Container Apps job (infra/containerapps).

const JOB_TEMPLATE: &str = "infra/containerapps/job.bicep";
const JOB_MAIN: &str = "infra/containerapps/main.bicep";

/// Longest single pause between webhook attempts, whatever `Retry-After`
/// says (src/config.rs `webhook_retry`; the README's configuration table
/// says "capped at 30 s").
const WEBHOOK_MAX_BACKOFF_SECS: i64 = 30;
const WEBHOOK_MAX_BACKOFF_TEXT: &str = "capped at 30 s";

/// Time the replica needs beyond the task itself for receiving the message
/// and settling it when the queue answers normally (a few calls of at most
/// 10 s each).
const RECEIVE_AND_SETTLE_ALLOWANCE_SECS: i64 = 60;

/// Most due outbox entries one job execution delivers after settling its
/// task message (job mode); the outbox scale rule starts one execution per
/// this many entries.
const JOB_OUTBOX_BATCH: i64 = 32;

/// Time for the outbox batch's queue calls beyond the deliveries themselves
/// (one receive, then one delete or visibility update per entry).
const OUTBOX_QUEUE_ALLOWANCE_SECS: i64 = 60;

/// The worker warns about a lease shorter than this (config::timing_warnings).
const SHORTEST_QUIET_VISIBILITY_SECS: i64 = 60;

/// One `{ name, value | secretRef }` entry of the job container's `env`.
#[derive(Debug)]
struct JobEnv {
    name: String,
    value: Option<Value>,
    secret_ref: Option<String>,
}

struct Job {
    bicep: Bicep,
    body: Value,
}

impl Job {
    fn load() -> Job {
        let bicep = Bicep::load(JOB_TEMPLATE);
        let jobs = bicep.resources_of("Microsoft.App/jobs");
        assert_eq!(jobs.len(), 1, "{JOB_TEMPLATE} declares one job");
        let body = jobs[0].body.clone();
        Job { bicep, body }
    }

    fn configuration(&self) -> &Value {
        self.body.at(&["properties", "configuration"])
    }

    fn env(&self) -> Vec<JobEnv> {
        let containers = self
            .body
            .at(&["properties", "template", "containers"])
            .items();
        assert_eq!(containers.len(), 1, "one container per execution");
        containers[0]
            .at(&["env"])
            .items()
            .iter()
            .map(|item| JobEnv {
                name: item
                    .get("name")
                    .and_then(Value::literal)
                    .unwrap_or_else(|| panic!("env entry without a literal name: {item:?}"))
                    .to_owned(),
                value: item.get("value").cloned(),
                secret_ref: item.get("secretRef").map(|r| {
                    r.literal()
                        .unwrap_or_else(|| panic!("secretRef is not a literal: {r:?}"))
                        .to_owned()
                }),
            })
            .collect()
    }

    fn env_value(&self, name: &str) -> Value {
        let env = self.env();
        let found: Vec<&JobEnv> = env.iter().filter(|e| e.name == name).collect();
        assert_eq!(found.len(), 1, "the job sets {name} once: {found:?}");
        found[0]
            .value
            .clone()
            .unwrap_or_else(|| panic!("{name} has no plain value"))
    }

    /// A string literal, or a var holding one.
    fn resolve_literal(&self, v: &Value) -> String {
        match v {
            Value::Expr(name) => self
                .bicep
                .var(name)
                .literal()
                .unwrap_or_else(|| panic!("var `{name}` is no literal"))
                .to_owned(),
            other => other
                .literal()
                .unwrap_or_else(|| panic!("{other:?} is no literal"))
                .to_owned(),
        }
    }

    /// Secret name -> its entry in `configuration.secrets`.
    fn secrets(&self) -> BTreeMap<String, Value> {
        self.configuration()
            .at(&["secrets"])
            .items()
            .iter()
            .map(|s| (self.resolve_literal(s.at(&["name"])), s.clone()))
            .collect()
    }
}

/// The env var whose vault entry a `keyVaultUrl` names.
fn vault_entry_of(key_vault_url: &Value) -> String {
    let url = key_vault_url
        .template()
        .unwrap_or_else(|| panic!("keyVaultUrl is not a string: {key_vault_url:?}"));
    url.strip_prefix("${vaultUri}secrets/${vaultEntryNames.")
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_else(|| {
            panic!("keyVaultUrl {url} is not ${{vaultUri}}secrets/${{vaultEntryNames.<VAR>}}")
        })
        .to_owned()
}

fn job_module_params() -> Value {
    let main = Bicep::load(JOB_MAIN);
    main.module("job.bicep").body.at(&["params"]).clone()
}

#[test]
fn container_apps_job_variables_are_read_by_the_binary_or_passed_to_handlers() {
    let binary = binary_env_vars();
    let job = Job::load();
    let env = job.env();
    assert!(env.len() >= 5, "the job container sets too little: {env:?}");
    let mut seen = BTreeSet::new();
    for entry in &env {
        assert!(seen.insert(&entry.name), "{} is set twice", entry.name);
        let known =
            binary.contains_key(&entry.name) || HANDLER_PASS_THROUGH.contains(&entry.name.as_str());
        assert!(
            known,
            "{JOB_TEMPLATE}: sets {}, but `worker env-vars` does not list it and it is no handler pass-through variable",
            entry.name
        );
        assert!(
            entry.value.is_some() != entry.secret_ref.is_some(),
            "{JOB_TEMPLATE}: {} needs exactly one of value / secretRef",
            entry.name
        );
        let secret = binary.get(&entry.name).is_some_and(|v| v.secret)
            || HANDLER_PASS_THROUGH.contains(&entry.name.as_str());
        if secret {
            assert!(
                entry.secret_ref.is_some(),
                "{JOB_TEMPLATE}: {} is a secret and must come from a secretRef",
                entry.name
            );
        }
    }

    // Job mode, for one client, with JSON logs for Log Analytics.
    assert_eq!(job.env_value("WORKER_MODE").literal(), Some("job"));
    assert_eq!(job.env_value("WORKER_CLIENT"), Value::Expr("client".into()));
    assert_eq!(job.env_value("WORKER_LOG_FORMAT").literal(), Some("json"));
    for absent in ["TASK_DATA", "WORKER_QUEUE_NAME", "WORKER_HANDLERS_FILE"] {
        assert!(
            !seen.contains(&absent.to_owned()),
            "{absent} does not belong in the job: the queue name and the task come from WORKER_CLIENT and the message"
        );
    }

    // Managed identity, no key: a connection string would win over the
    // account name in the binary, so it must not be there at all.
    assert_eq!(
        job.env_value("AZURE_STORAGE_ACCOUNT"),
        Value::Expr("storageAccountName".into())
    );
    assert_eq!(
        job.env_value("AZURE_CLIENT_ID"),
        Value::Expr("identityClientId".into())
    );
    for absent in [
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_QUEUE_ENDPOINT",
    ] {
        assert!(
            !seen.contains(&absent.to_owned()),
            "the job authenticates with its identity; {absent} must not be set"
        );
    }
    let params = job_module_params();
    assert_eq!(
        params.get("identityClientId"),
        Some(&Value::Expr("identity.outputs.clientId".into()))
    );
    assert_eq!(
        params.get("storageAccountName"),
        Some(&Value::Expr("storage.outputs.accountName".into()))
    );
    assert_eq!(
        params.get("identityId"),
        Some(&Value::Expr("identity.outputs.id".into()))
    );
}

#[test]
fn container_apps_job_scales_on_the_tasks_queue_and_the_webhook_outbox() {
    let help = format!("{}\n{}", binary_help(&[]), binary_help(&["deliver"]));
    for name in ["<client>-tasks", "<client>-webhooks"] {
        assert!(
            help.contains(name),
            "`worker --help` no longer names {name}"
        );
    }
    let job = Job::load();
    assert_eq!(
        job.bicep.var("tasksQueueName").template(),
        Some("${client}-tasks"),
        "the scaler must watch the queue the worker consumes"
    );
    assert_eq!(
        job.bicep.var("webhooksQueueName").template(),
        Some("${client}-webhooks"),
        "the scaler must watch the outbox the worker drains"
    );

    let scale = job
        .configuration()
        .at(&["eventTriggerConfig", "scale"])
        .clone();
    assert_eq!(
        scale.at(&["rules"]),
        &Value::Expr(
            "scalerAuth == 'identity' ? scaleRulesWithIdentity : scaleRulesWithConnectionString"
                .into()
        )
    );
    assert_eq!(
        job.bicep.param_default("scalerAuth").literal(),
        Some("identity")
    );

    // Tasks: one execution per message; messages that running executions
    // hold leased still count (the default strategy), because the scaler
    // subtracts running executions.
    let tasks = job.bicep.var("tasksRuleMetadata");
    assert_eq!(
        tasks.get("queueName"),
        Some(&Value::Expr("tasksQueueName".into()))
    );
    assert_eq!(
        tasks.get("queueLength").and_then(Value::literal),
        Some("1"),
        "one execution per message"
    );
    assert!(
        tasks.get("queueLengthStrategy").is_none(),
        "the tasks rule counts leased messages too"
    );
    // Outbox: one execution per batch an execution delivers, counting only
    // entries that are due (an entry waits invisible for its next attempt).
    let outbox = job.bicep.var("outboxRuleMetadata");
    assert_eq!(
        outbox.get("queueName"),
        Some(&Value::Expr("webhooksQueueName".into()))
    );
    assert_eq!(
        outbox.get("queueLength").and_then(Value::literal),
        Some(JOB_OUTBOX_BATCH.to_string().as_str()),
        "one execution per outbox batch"
    );
    assert_eq!(
        outbox.get("queueLengthStrategy").and_then(Value::literal),
        Some("visibleonly"),
        "entries waiting for their next attempt must not start executions"
    );
    // Both count queues of the account the worker reads.
    for metadata in [tasks, outbox] {
        assert_eq!(
            metadata.get("accountName"),
            Some(&job.env_value("AZURE_STORAGE_ACCOUNT"))
        );
    }

    // The same two rules in both authentication variants.
    let connection_auth = job.bicep.var("connectionStringAuth").items();
    assert_eq!(connection_auth.len(), 1);
    for variant in ["scaleRulesWithIdentity", "scaleRulesWithConnectionString"] {
        let rules = job.bicep.var(variant).items();
        let metadata: Vec<&Value> = rules.iter().map(|r| r.at(&["metadata"])).collect();
        assert_eq!(
            metadata,
            [
                &Value::Expr("tasksRuleMetadata".into()),
                &Value::Expr("outboxRuleMetadata".into())
            ],
            "{variant}: one rule on the tasks queue, one on the outbox"
        );
        let names: BTreeSet<String> = rules
            .iter()
            .map(|r| job.resolve_literal(r.at(&["name"])))
            .collect();
        assert_eq!(names.len(), 2, "{variant}: rule names are distinct");
        for rule in rules {
            assert_eq!(
                rule.get("type").and_then(Value::literal),
                Some("azure-queue"),
                "{variant}"
            );
            if variant == "scaleRulesWithIdentity" {
                assert_eq!(
                    rule.get("identity"),
                    Some(&Value::Expr("identityId".into()))
                );
                assert!(rule.get("auth").is_none());
            } else {
                assert!(rule.get("identity").is_none());
                assert_eq!(
                    rule.get("auth"),
                    Some(&Value::Expr("connectionStringAuth".into()))
                );
            }
        }
    }

    // The fallback reads the connection string from the vault entry of
    // AZURE_STORAGE_CONNECTION_STRING, through a job secret.
    assert_eq!(
        connection_auth[0]
            .get("triggerParameter")
            .and_then(Value::literal),
        Some("connection")
    );
    let secret_name = job.resolve_literal(connection_auth[0].at(&["secretRef"]));
    let secrets = job.secrets();
    let secret = secrets
        .get(&secret_name)
        .unwrap_or_else(|| panic!("the scaler refers to a missing secret {secret_name}"));
    assert_eq!(
        vault_entry_of(secret.at(&["keyVaultUrl"])),
        "AZURE_STORAGE_CONNECTION_STRING"
    );
}

#[test]
fn container_apps_job_leaves_retries_and_the_timeout_to_the_worker() {
    let binary = binary_env_vars();
    let default_of = |name: &str| -> f64 {
        binary[name]
            .default
            .as_deref()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{name} has no numeric default"))
    };
    let job = Job::load();
    let config = job.configuration();
    assert_eq!(config.at(&["triggerType"]).literal(), Some("Event"));
    assert_eq!(
        config.at(&["replicaRetryLimit"]),
        &Value::Num(0),
        "retries come from the queue's dequeue count, not from the platform"
    );
    let trigger = config.at(&["eventTriggerConfig"]);
    assert_eq!(trigger.at(&["parallelism"]), &Value::Num(1));
    assert_eq!(trigger.at(&["replicaCompletionCount"]), &Value::Num(1));
    assert_eq!(trigger.at(&["scale", "minExecutions"]), &Value::Num(0));
    assert_eq!(
        trigger.at(&["scale", "maxExecutions"]),
        &Value::Expr("maxExecutions".into())
    );
    assert!(job.bicep.param_int_default("maxExecutions") >= 1);

    // replicaTimeout = taskTimeoutSeconds + settleMarginSeconds, with the
    // margin's lower bound covering a webhook delivered with every retry
    // (binary defaults, which the job does not override), the queue calls,
    // and one batch of outbox deliveries.
    assert_eq!(
        config.at(&["replicaTimeout"]),
        &Value::Expr("replicaTimeoutSeconds".into())
    );
    let Value::Expr(sum) = job.bicep.var("replicaTimeoutSeconds") else {
        panic!("replicaTimeoutSeconds is not an expression");
    };
    let terms: Vec<&str> = sum.split('+').map(str::trim).collect();
    assert_eq!(
        terms,
        ["taskTimeoutSeconds", "settleMarginSeconds"],
        "replicaTimeoutSeconds must be the task timeout plus the margin, found `{sum}`"
    );
    assert_eq!(
        job.env_value("WORKER_TASK_TIMEOUT"),
        Value::Expr("string(taskTimeoutSeconds)".into()),
        "the worker's timeout is the one the replica timeout is derived from"
    );
    let env_names: BTreeSet<String> = job.env().into_iter().map(|e| e.name).collect();
    for webhook_var in [
        "WORKER_WEBHOOK_MAX_ATTEMPTS",
        "WORKER_WEBHOOK_TIMEOUT",
        "WORKER_WEBHOOK_INITIAL_BACKOFF",
        "WORKER_WEBHOOK_CONCURRENCY",
    ] {
        assert!(
            !env_names.contains(webhook_var),
            "{webhook_var} changes the webhook time budget: update settleMarginSeconds and this test"
        );
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    assert!(
        readme.contains(WEBHOOK_MAX_BACKOFF_TEXT),
        "README no longer says the webhook backoff is {WEBHOOK_MAX_BACKOFF_TEXT}"
    );
    let attempts = default_of("WORKER_WEBHOOK_MAX_ATTEMPTS");
    let webhook_worst = attempts * default_of("WORKER_WEBHOOK_TIMEOUT")
        + (attempts - 1.0) * WEBHOOK_MAX_BACKOFF_SECS as f64;
    // Then one outbox batch: one attempt per entry, each bounded by the
    // webhook timeout, run concurrently with at most three quarters of the
    // concurrency on one host (all entries may share a host; gate.rs).
    let total = default_of("WORKER_WEBHOOK_CONCURRENCY");
    let per_host = (total - (total / 4.0).floor()).min(total - 1.0).max(1.0);
    let outbox_rounds = (JOB_OUTBOX_BATCH as f64 / per_host).ceil();
    let outbox_worst =
        outbox_rounds * default_of("WORKER_WEBHOOK_TIMEOUT") + OUTBOX_QUEUE_ALLOWANCE_SECS as f64;
    let needed = webhook_worst + RECEIVE_AND_SETTLE_ALLOWANCE_SECS as f64 + outbox_worst;
    for file in [JOB_TEMPLATE, JOB_MAIN] {
        let bicep = Bicep::load(file);
        let min_margin = bicep.param_min("settleMarginSeconds");
        assert!(
            min_margin as f64 >= needed,
            "{file}: settleMarginSeconds may be {min_margin} s, but a webhook with every retry plus settlement plus an outbox batch needs {needed} s"
        );
        assert!(bicep.param_int_default("settleMarginSeconds") >= min_margin);
        assert!(bicep.param_min("taskTimeoutSeconds") >= 1);
        assert_eq!(
            bicep.param_int_default("taskTimeoutSeconds") as f64,
            default_of("WORKER_TASK_TIMEOUT"),
            "{file}: taskTimeoutSeconds vs the binary's default"
        );
        assert_eq!(
            bicep.param_default("cpuCores").literal(),
            Some(DOCUMENTED_CPU_CORES),
            "{file}: cpuCores"
        );
        assert_eq!(
            bicep.param_default("memoryInGb").literal(),
            Some(DOCUMENTED_MEMORY_GB),
            "{file}: memoryInGb"
        );

        // A lease the worker renews without warnings.
        assert!(bicep.param_min("visibilityTimeoutSeconds") >= SHORTEST_QUIET_VISIBILITY_SECS);
    }
    let params = job_module_params();
    for passed in [
        "taskTimeoutSeconds",
        "settleMarginSeconds",
        "visibilityTimeoutSeconds",
        "maxDequeueCount",
        "retryDelaySeconds",
        "maxExecutions",
        "scalerAuth",
        "cpuCores",
        "memoryInGb",
    ] {
        assert_eq!(
            params.get(passed),
            Some(&Value::Expr(passed.into())),
            "{JOB_MAIN} passes its own {passed} to job.bicep"
        );
    }
    for (var, param) in [
        ("WORKER_VISIBILITY_TIMEOUT", "visibilityTimeoutSeconds"),
        ("WORKER_MAX_DEQUEUE_COUNT", "maxDequeueCount"),
        ("WORKER_RETRY_DELAY", "retryDelaySeconds"),
    ] {
        assert_eq!(
            job.env_value(var),
            Value::Expr(format!("string({param})")),
            "{var}"
        );
    }

    let requests = job
        .body
        .at(&["properties", "template", "containers"])
        .items()[0]
        .at(&["resources"])
        .clone();
    assert_eq!(
        requests.get("cpu"),
        Some(&Value::Expr("json(cpuCores)".into()))
    );
    assert_eq!(
        requests.get("memory").and_then(Value::template),
        Some("${memoryInGb}Gi")
    );
}

#[test]
fn container_apps_secrets_are_key_vault_references_named_by_the_vault_module() {
    let names = vault_entry_names();
    let job = Job::load();
    let secrets = job.secrets();
    assert!(!secrets.is_empty());

    // Each job secret is a reference to the vault entry of one variable,
    // resolved with the job identity, named after that entry in lowercase.
    let mut secret_var = BTreeMap::new();
    for (name, secret) in &secrets {
        assert!(
            secret.get("value").is_none(),
            "job secret {name} carries a value; it must be a Key Vault reference"
        );
        assert_eq!(
            secret.get("identity"),
            Some(&Value::Expr("identityId".into())),
            "job secret {name} is resolved with the job identity"
        );
        let var = vault_entry_of(secret.at(&["keyVaultUrl"]));
        let entry = names.get(&var).unwrap_or_else(|| {
            panic!("job secret {name} refers to {var}, which has no vault entry")
        });
        assert_eq!(
            *name,
            entry.to_lowercase(),
            "job secret names follow the vault entry names"
        );
        secret_var.insert(name.clone(), var);
    }

    // Each secret variable comes from the secret of its own vault entry.
    let mut referenced = 0;
    for entry in job.env() {
        let Some(secret_ref) = &entry.secret_ref else {
            continue;
        };
        let var = secret_var
            .get(secret_ref)
            .unwrap_or_else(|| panic!("{} refers to a missing secret {secret_ref}", entry.name));
        assert_eq!(
            *var, entry.name,
            "{} reads the vault entry of {var}",
            entry.name
        );
        referenced += 1;
    }
    assert!(referenced >= 1, "the job container reads no secret at all");
    assert!(
        job.env()
            .iter()
            .any(|e| e.name == "WORKER_WEBHOOK_SECRET" && e.secret_ref.is_some()),
        "webhooks are signed: the job needs WORKER_WEBHOOK_SECRET"
    );

    // The image is pulled with the same identity; no registry password.
    let registries = job.configuration().at(&["registries"]).items();
    assert_eq!(registries.len(), 1);
    assert_eq!(
        registries[0].get("identity"),
        Some(&Value::Expr("identityId".into()))
    );
    assert!(registries[0].get("passwordSecretRef").is_none());
    let identity = job.body.at(&["identity"]);
    assert_eq!(identity.at(&["type"]).literal(), Some("UserAssigned"));
    assert!(identity
        .at(&["userAssignedIdentities"])
        .get("${identityId}")
        .is_some());

    // main.bicep wires the vault module's names and URI into the job and
    // grants the one identity every role the job needs, through the shared
    // modules (not copies of them).
    let params = job_module_params();
    assert_eq!(
        params.get("vaultEntryNames"),
        Some(&Value::Expr("keyVault.outputs.entryNames".into()))
    );
    assert_eq!(
        params.get("vaultUri"),
        Some(&Value::Expr("keyVault.outputs.vaultUri".into()))
    );
    let main = Bicep::load(JOB_MAIN);
    let principal = Value::Expr("identity.outputs.principalId".into());
    for (module, grant) in [
        ("../modules/registry.bicep", "pullPrincipalIds"),
        ("../modules/keyvault.bicep", "secretsUserPrincipalIds"),
        ("../modules/storage.bicep", "dataContributorPrincipalIds"),
    ] {
        let granted = main.module(module).body.at(&["params", grant]).items();
        assert!(
            granted.contains(&principal),
            "{JOB_MAIN}: {module} must grant the job identity via {grant}"
        );
    }
    main.module("../modules/identity.bicep");
    main.module("../modules/monitoring.bicep");
    let declared: Vec<&str> = main
        .resources
        .iter()
        .filter(|r| !r.existing)
        .map(|r| r.ty.as_str())
        .collect();
    assert!(
        declared.is_empty(),
        "{JOB_MAIN} declares {declared:?} itself instead of using infra/modules"
    );
}

#[test]
fn container_apps_readme_documents_every_parameter() {
    let main = Bicep::load(JOB_MAIN);
    let readme = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/containerapps/README.md"),
    )
    .expect("infra/containerapps/README.md");
    for param in main.params.keys() {
        assert!(
            readme.contains(&format!("`{param}`")),
            "infra/containerapps/README.md does not document parameter `{param}`"
        );
    }
    let top = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    assert!(
        top.contains("infra/containerapps/README.md"),
        "the top-level README no longer links the Container Apps path"
    );
}

/// Seconds from SIGTERM to exit at most: the grace, then the settle margin
/// (worker::poller::SETTLE_MARGIN), then a second for the process to end.
fn shutdown_budget_secs() -> f64 {
    let grace: f64 = binary_env_vars()["WORKER_SHUTDOWN_GRACE"]
        .default
        .as_deref()
        .expect("WORKER_SHUTDOWN_GRACE has a default")
        .parse()
        .expect("a number of seconds");
    grace + worker::poller::SETTLE_MARGIN.as_secs_f64() + 1.0
}

/// `45s`, `45`, `1min 30s`, `1m30s` as seconds (systemd and Compose forms).
fn duration_secs(v: &str) -> f64 {
    let mut total = 0.0;
    let mut num = String::new();
    let mut unit = String::new();
    let mut flush = |num: &mut String, unit: &mut String| {
        if num.is_empty() {
            return;
        }
        let n: f64 = num.parse().expect("a number");
        total += n * match unit.as_str() {
            "" | "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            other => panic!("unknown time unit {other:?} in {v:?}"),
        };
        num.clear();
        unit.clear();
    };
    for c in v.chars().filter(|c| !c.is_whitespace()) {
        if c.is_ascii_digit() || c == '.' {
            if !unit.is_empty() {
                flush(&mut num, &mut unit);
            }
            num.push(c);
        } else {
            unit.push(c);
        }
    }
    flush(&mut num, &mut unit);
    total
}

#[test]
fn every_kill_budget_covers_the_shutdown_budget() {
    let budget = shutdown_budget_secs();
    let read = |path: &str| {
        std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let setting = |text: &str, key: &str, path: &str| -> f64 {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{path} sets no {key}"));
        duration_secs(line[key.len()..].trim_start_matches([':', '=', ' ']))
    };
    let unit = read("infra/vps/worker.service");
    let stop = setting(&unit, "TimeoutStopSec", "infra/vps/worker.service");
    assert!(
        stop >= budget,
        "worker.service: TimeoutStopSec={stop}s is below the worker's shutdown budget of {budget}s \
         (WORKER_SHUTDOWN_GRACE + settle margin): systemd would SIGKILL a worker that is still settling"
    );
    let compose = read("infra/vps/docker-compose.worker.yml");
    let grace = setting(
        &compose,
        "stop_grace_period",
        "infra/vps/docker-compose.worker.yml",
    );
    assert!(
        grace >= budget,
        "docker-compose.worker.yml: stop_grace_period={grace}s is below the shutdown budget of {budget}s"
    );
    assert_eq!(duration_secs("1min 30s"), 90.0);
    assert_eq!(duration_secs("45s"), 45.0);
}

/// Container Apps sends SIGTERM, then SIGKILL after the replica's
/// termination grace: 30 s unless the template sets another (Microsoft's
/// ContainerApp Template model: "Defaults to 30 seconds"). Job mode cancels
/// its task at once and must be out well within that.
#[test]
fn the_container_apps_kill_budget_covers_job_mode_shutdown() {
    const DEFAULT_TERMINATION_GRACE_SECS: u64 = 30;
    let budget = worker::job::ONE_MESSAGE_SHUTDOWN_BUDGET.as_secs() + 1;
    for file in [
        "infra/containerapps/job.bicep",
        "infra/containerapps/main.bicep",
    ] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let grace = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("terminationGracePeriodSeconds:"))
            .map_or(DEFAULT_TERMINATION_GRACE_SECS, |v| {
                v.trim().parse().expect("a literal number of seconds")
            });
        assert!(
            grace >= budget,
            "{file}: termination grace {grace}s is below job mode's shutdown budget of {budget}s"
        );
    }
}

// ---------------------------------------------------------------------------
// What Azure refuses on a first or a later deployment (issue: the first
// deployment must succeed, and the tenth must too).

/// The longest client name every template accepts (`@maxLength` of `client`).
const LONGEST_CLIENT: usize = 20;
/// `uniqueString()` always returns 13 characters.
const UNIQUE_STRING_LEN: usize = 13;
/// A resource group name is at most 90 characters.
const RESOURCE_GROUP_NAME_MAX: usize = 90;

/// The longest text a name expression can produce for a 20-character
/// client: literals count as written, `${...}` parts by what they can hold.
fn longest(bicep: &Bicep, v: &Value) -> usize {
    match v {
        Value::Str { text, .. } => {
            let mut len = 0;
            let mut rest = text.as_str();
            while let Some(start) = rest.find("${") {
                len += rest[..start].chars().count();
                let end = rest[start..].find('}').expect("closed interpolation") + start;
                len += longest_expr(bicep, &rest[start + 2..end]);
                rest = &rest[end + 1..];
            }
            len + rest.chars().count()
        }
        Value::Expr(e) => longest_expr(bicep, e),
        other => panic!("cannot size {other:?}"),
    }
}

fn longest_expr(bicep: &Bicep, expr: &str) -> usize {
    let expr = expr.trim();
    if let Some(args) = expr.strip_prefix("take(").and_then(|a| a.strip_suffix(')')) {
        let (inner, n) = args.rsplit_once(',').expect("take(x, n)");
        let n: usize = n.trim().parse().expect("literal take length");
        return longest_expr(bicep, inner).min(n);
    }
    if expr.starts_with("uniqueString(") {
        return UNIQUE_STRING_LEN;
    }
    if expr == "resourceGroup().name" {
        return RESOURCE_GROUP_NAME_MAX;
    }
    if expr == "client" || expr == "replace(client, '-', '')" {
        return LONGEST_CLIENT;
    }
    if expr.starts_with('\'') {
        return expr.trim_matches('\'').chars().count();
    }
    if let Some(v) = bicep.vars.get(expr) {
        return longest(bicep, v);
    }
    if let Some(Some(v)) = bicep.params.get(expr) {
        return longest(bicep, v);
    }
    panic!("{}: cannot size `{expr}`", bicep.file.display())
}

#[test]
fn names_fit_azure_limits_for_the_longest_client() {
    // Name lengths: "Naming rules and restrictions for Azure resources"
    // (learn.microsoft.com/azure/azure-resource-manager/management/resource-name-rules);
    // Container Apps jobs: "Jobs in Azure Container Apps" (2-32 characters).
    for file in ["infra/aci/main.bicep", "infra/containerapps/main.bicep"] {
        let main = Bicep::load(file);
        match main
            .param_decorators
            .get("client")
            .and_then(|d| d.get("maxLength"))
        {
            Some(Value::Num(n)) => assert_eq!(*n as usize, LONGEST_CLIENT, "{file}"),
            other => panic!("{file}: client @maxLength {other:?}"),
        }
        for (var, limit) in [
            ("storageAccountName", 24),
            ("keyVaultName", 24),
            ("registryName", 50),
            ("workspaceName", 63),
        ] {
            let len = longest(&main, main.var(var));
            assert!(
                len <= limit,
                "{file}: {var} may be {len} characters, Azure takes {limit}"
            );
        }
        // Storage accounts, vaults and registries are globally unique: the
        // whole 13-character suffix must survive, the client is what gets cut.
        for var in ["storageAccountName", "keyVaultName", "registryName"] {
            let text = main.var(var).template().unwrap_or_else(|| {
                panic!("{file}: {var} must be an interpolated string, not cut as a whole")
            });
            assert!(text.ends_with("${suffix}"), "{file}: {var} = {text}");
        }
        assert!(format!("{:?}", main.var("suffix"))
            .contains("uniqueString(resourceGroup().id, client)"));
        let identity = main
            .modules
            .iter()
            .find(|m| m.path == "../modules/identity.bicep")
            .expect("identity module");
        assert!(longest(&main, identity.body.at(&["params", "name"])) <= 128);
    }
    let jobs = Bicep::load("infra/containerapps/main.bicep");
    assert!(
        longest(&jobs, jobs.var("jobName")) <= 32,
        "Container Apps job name over 32"
    );
    assert!(longest(&jobs, jobs.var("environmentName")) <= 60);

    let logic = Bicep::load(LOGIC_APP);
    for workflow in logic.resources_of("Microsoft.Logic/workflows") {
        let len = longest(&logic, workflow.body.at(&["name"]));
        assert!(
            len <= 80,
            "workflow {} may be {len} characters",
            workflow.symbol
        );
    }
    assert!(longest(&logic, logic.var("deliverGroupName")) <= 63);
    let storage = Bicep::load("infra/modules/storage.bicep");
    for var in [
        "tasksQueueName",
        "poisonQueueName",
        "webhooksQueueName",
        "webhooksPoisonQueueName",
    ] {
        assert!(longest(&storage, storage.var(var)) <= 63, "{var}");
    }
}

#[test]
fn redeployments_keep_what_azure_will_not_change() {
    // A budget's start date cannot be updated ("Start date of budgets cannot
    // be updated", Consumption Budgets - Create Or Update): no template may
    // default it to a value that moves, such as utcNow().
    for file in FILES {
        let bicep = Bicep::load(file);
        if let Some(default) = bicep.params.get("budgetStartDate") {
            assert!(
                default.is_none(),
                "{file}: budgetStartDate defaults to {default:?}; it must be set once and kept"
            );
        }
    }
    let monitoring = Bicep::load("infra/modules/monitoring.bicep");
    let budget = &monitoring.resources_of("Microsoft.Consumption/budgets")[0].body;
    assert_eq!(
        budget.at(&["properties", "timePeriod", "startDate"]),
        &Value::Expr("budgetStartDate".into())
    );
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/aci/README.md"))
            .expect("README");
    assert!(
        readme.contains("budgetStartDate"),
        "the ACI README says how to set budgetStartDate once"
    );

    // The custom role's name is unique in the tenant and at most 128
    // characters ("Custom role properties", learn.microsoft.com/azure/
    // role-based-access-control/custom-roles): the resource group's name
    // repeats across subscriptions, the hash of its id does not.
    let logic = Bicep::load(LOGIC_APP);
    let role = &logic.resources_of("Microsoft.Authorization/roleDefinitions")[0].body;
    let role_name = role.at(&["properties", "roleName"]);
    assert!(
        role_name
            .template()
            .is_some_and(|t| t.contains("${uniqueString(resourceGroup().id)}")),
        "roleName {role_name:?} must hold the hash of the resource group id"
    );
    assert!(
        longest(&logic, role_name) <= 128,
        "roleName may exceed 128 characters"
    );

    // A rollout is a redeployment: it must not switch intake off.
    let main = Bicep::load("infra/aci/main.bicep");
    for file in [&main, &logic] {
        assert_eq!(
            file.param_default("triggerState").literal(),
            Some("Enabled"),
            "{}: triggerState must default to Enabled",
            file.file.display()
        );
    }
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/aci/main.parameters.example.json"),
    )
    .expect("example parameters");
    assert!(
        !example.contains("\"Disabled\""),
        "the example parameter file must not disable the trigger on every redeployment"
    );
    // ... and when intake stalls anyway, an alert says so.
    let cleanup = workflow_definition("cleanup");
    let peek = cleanup.action("Peek_tasks");
    assert!(peek
        .at(&["inputs", "uri"])
        .template()
        .is_some_and(|u| u.contains("${tasksQueueName}/messages?peekonly=true")));
    let if_backlog = cleanup.action("If_backlog");
    assert!(action_names(if_backlog.at(&["actions"])).contains("Report_backlog"));
    let query = logic
        .var("backlogQuery")
        .template()
        .expect("backlogQuery text")
        .to_owned();
    assert!(query.contains("\"Report_backlog\""));
    let alert = logic
        .resources_of("Microsoft.Insights/scheduledQueryRules")
        .into_iter()
        .find(|r| r.symbol == "backlogAlert")
        .expect("backlogAlert");
    assert_eq!(
        alert.body.at(&["properties", "criteria", "allOf"]).items()[0].at(&["query"]),
        &Value::Expr("backlogQuery".into())
    );
    let readers: Vec<&Resource> = logic
        .resources_of("Microsoft.Authorization/roleAssignments")
        .into_iter()
        .filter(|r| r.body.get("scope") == Some(&Value::Expr("tasksQueue".into())))
        .collect();
    assert_eq!(
        readers.len(),
        1,
        "the cleanup reads the tasks queue, and only it"
    );
    assert_eq!(
        readers[0].body.at(&["properties", "principalId"]),
        &Value::Expr("cleanup.identity.principalId".into())
    );

    // The creation tag is ISO 8601 on both sides, which ticks() parses.
    let manual = Bicep::load("infra/aci/worker-container.bicep");
    assert_eq!(
        manual.param_default("createdAt"),
        &Value::Expr("utcNow('o')".into())
    );
    let definition = trigger_definition();
    let tags = format!(
        "{:?}",
        definition
            .action("Create_group")
            .at(&["inputs", "body", "tags"])
    );
    assert!(tags.contains("'worker-created': '@{utcNow()}'"), "{tags}");
}

#[test]
fn workflows_hold_least_privilege() {
    let logic = Bicep::load(LOGIC_APP);
    // The launcher role touches container groups only; attaching an identity
    // is granted on the worker identity alone (Managed Identity Operator).
    let role = format!(
        "{:?}",
        logic.resources_of("Microsoft.Authorization/roleDefinitions")[0].body
    );
    assert!(
        !role.contains("userAssignedIdentities"),
        "the launcher role must not assign identities: {role}"
    );
    for needed in [
        "locations/operations/read",
        "locations/operationResults/read",
    ] {
        assert!(
            role.contains(needed),
            "the trigger waits for a 202 delete: {needed}"
        );
    }
    let assignments = logic.resources_of("Microsoft.Authorization/roleAssignments");
    let on = |scope: &str| -> BTreeSet<String> {
        assignments
            .iter()
            .filter(|r| r.body.get("scope") == Some(&Value::Expr(scope.into())))
            .map(|r| format!("{:?}", r.body.at(&["properties", "principalId"])))
            .collect()
    };
    assert_eq!(
        on("workerIdentity"),
        BTreeSet::from([
            format!("{:?}", Value::Expr("trigger.identity.principalId".into())),
            format!("{:?}", Value::Expr("deliver.identity.principalId".into())),
        ])
    );
    // The trigger reads the secrets it passes, one assignment per secret,
    // never the whole vault (which holds the storage connection string).
    assert!(on("vault").is_empty(), "no workflow reads the whole vault");
    assert_eq!(
        on("triggerSecretEntries[i]"),
        BTreeSet::from([format!(
            "{:?}",
            Value::Expr("trigger.identity.principalId".into())
        )])
    );
    let names = format!("{:?}", logic.var("triggerSecretNames"));
    let definition = trigger_definition();
    let mut all = Vec::new();
    actions_in(definition.at(&["actions"]), &mut all);
    let reads: BTreeSet<&str> = all
        .iter()
        .filter_map(|(n, _)| n.strip_prefix("Get_"))
        .collect();
    assert!(!reads.is_empty());
    for var in &reads {
        assert!(
            names.contains(&format!("vaultEntryNames.{var}")),
            "{var} read but not granted"
        );
    }
    assert!(!names.contains("AZURE_STORAGE_CONNECTION_STRING"));

    // The cleanup does not wait for asynchronous deletes, and every request
    // of it and of the drain has an explicit retry policy inside inputs.
    let cleanup = workflow_definition("cleanup");
    assert_eq!(
        cleanup
            .action("Delete_group")
            .get("operationOptions")
            .and_then(Value::literal),
        Some("DisableAsyncPattern")
    );
    for symbol in ["cleanup", "deliver"] {
        assert_retry_policies_inside_inputs(&logic, &workflow_definition(symbol), symbol);
    }
}

/// Every workflow, by symbol.
const WORKFLOWS: &[&str] = &["trigger", "cleanup", "deliver"];

/// An action as text without the actions nested in it (those are checked on
/// their own).
fn own_text(action: &Value) -> String {
    let mut own = action.clone();
    if let Value::Object(entries) = &mut own {
        entries.retain(|(k, _)| !["actions", "else", "cases", "default"].contains(&k.as_str()));
    }
    format!("{own:?}")
}

#[test]
fn queue_rest_calls_carry_their_date_and_read_xml_as_text() {
    // With an Entra ID token, Storage still wants x-ms-date (and answers 403
    // without it); and its XML answers start with a byte-order mark, on which
    // xml() may fail, so no workflow parses them with xml().
    let bicep = Bicep::load(LOGIC_APP);
    let mut calls = 0;
    for workflow in WORKFLOWS {
        let definition = workflow_definition(workflow);
        let mut all = Vec::new();
        actions_in(definition.at(&["actions"]), &mut all);
        for (name, action) in &all {
            let text = own_text(action);
            assert!(
                !text.contains("xml("),
                "{workflow}: {name} parses Storage's answer with xml(), which may trip on its byte-order mark; \
                 count the elements in string(body(...)) instead"
            );
            if action.at(&["type"]).literal() != Some("Http") {
                continue;
            }
            let uri = action.at(&["inputs", "uri"]).template().unwrap_or_default();
            if !uri.contains("primaryEndpoints.queue") {
                continue;
            }
            calls += 1;
            let headers = action
                .at(&["inputs"])
                .get("headers")
                .map(|h| resolve(&bicep, h))
                .unwrap_or_else(|| {
                    panic!("{workflow}: {name} calls the Queue service without headers")
                });
            assert!(
                headers.get("x-ms-version").is_some(),
                "{workflow}: {name} calls the Queue service without x-ms-version"
            );
            let date = headers
                .get("x-ms-date")
                .and_then(Value::literal)
                .unwrap_or_else(|| {
                    panic!("{workflow}: {name} calls the Queue service without x-ms-date (Storage answers 403)")
                });
            assert_eq!(date, "@{formatDateTime(utcNow(), 'r')}", "RFC 1123");
        }
    }
    assert!(calls >= 2, "the peeks of the cleanup and the drain");
}

#[test]
fn actions_that_read_the_task_text_are_secured() {
    // Logic Apps hides an action's inputs by itself only when they come from
    // the (secure) trigger outputs directly, never its outputs, and a
    // variable can never be secured. So: every action that reads the message
    // text, or the output of an action that did, hides its inputs and
    // outputs, and no variable ever holds it.
    let bicep = Bicep::load(LOGIC_APP);
    let secure = bicep.var("secureInputsAndOutputs");
    for workflow in WORKFLOWS {
        let definition = workflow_definition(workflow);
        let mut all = Vec::new();
        actions_in(definition.at(&["actions"]), &mut all);
        let mut tainted: BTreeSet<String> = BTreeSet::new();
        loop {
            let before = tainted.len();
            for (name, action) in &all {
                let text = own_text(action);
                let reads = text.contains("MessageText")
                    || tainted.iter().any(|t| {
                        text.contains(&format!("outputs('{t}')"))
                            || text.contains(&format!("body('{t}')"))
                    });
                if reads {
                    tainted.insert(name.clone());
                }
            }
            if tainted.len() == before {
                break;
            }
        }
        for name in &tainted {
            let action = &all.iter().find(|(n, _)| n == name).expect("action").1;
            let kind = action.at(&["type"]).literal().unwrap_or_default();
            assert!(
                kind != "InitializeVariable" && kind != "SetVariable",
                "{workflow}: {name} puts the task text into a variable, which can never be secured"
            );
            let secured = match action.get("runtimeConfiguration") {
                Some(v) => resolve(&bicep, v).get("secureData") == secure.get("secureData"),
                None => false,
            };
            assert!(
                secured,
                "{workflow}: {name} reads the task text but does not secure its inputs and outputs \
                 (runtimeConfiguration: secureInputsAndOutputs): anyone with Reader on the Logic App would see the task"
            );
        }
        if *workflow == "trigger" {
            assert_eq!(
                tainted,
                BTreeSet::from(["Create_group".to_owned()]),
                "the create is the only action that reads the task text"
            );
        }
    }
}

/// Every request of a workflow has an explicit retry policy where the
/// Workflow Definition Language reads it: inside `inputs`, never beside it.
fn assert_retry_policies_inside_inputs(bicep: &Bicep, definition: &Value, workflow: &str) {
    let mut all = Vec::new();
    actions_in(definition.at(&["actions"]), &mut all);
    for (name, action) in &all {
        if matches!(
            action.at(&["type"]).literal(),
            Some("Http" | "ApiConnection")
        ) {
            assert!(
                resolve(bicep, action.at(&["inputs"]))
                    .get("retryPolicy")
                    .is_some(),
                "{workflow}: {name} has no explicit retryPolicy inside inputs"
            );
            assert!(
                action.get("retryPolicy").is_none(),
                "{workflow}: {name} has a retryPolicy beside inputs"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The task dashboard reads what the binary writes.

/// Every key path of a JSON value (`span.task_type`), objects only.
fn key_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let serde_json::Value::Object(map) = v {
        for (k, child) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone());
            key_paths(child, &path, out);
        }
    }
}

/// The field names of the `tracing` event that logs `text` as its message, read
/// from the macro call in `source` (`tracing::info!(queue = %q.name(), depth,
/// "queue depth")` gives `queue`, `depth`); `None` when no call logs it.
fn fields_logged_with(source: &str, text: &str) -> Option<BTreeSet<String>> {
    let end = source.find(&format!("\"{text}\""))?;
    let start = source[..end].rfind("tracing::")?;
    let args = &source[start..end];
    let args = &args[args.find('(')? + 1..];
    let mut fields = BTreeSet::new();
    let (mut depth, mut from) = (0usize, 0usize);
    for (i, c) in args.char_indices().chain([(args.len(), ',')]) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                let arg = args[from..i].trim();
                let name = arg.split('=').next().unwrap_or("").trim();
                let name = name.trim_start_matches(['%', '?']);
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    fields.insert(name.to_owned());
                }
                from = i + 1;
            }
            _ => {}
        }
    }
    Some(fields)
}

#[test]
fn dashboard_queries_read_what_the_binary_writes() {
    // Real JSON lines: one task that succeeds, one that fails, in the mode
    // the ACI groups run (single-task; Container Apps' job mode logs the same
    // lines through the same execute::execute).
    let mut paths = BTreeSet::new();
    let mut messages = BTreeSet::new();
    for task in [
        r#"{"task_id":"dash-1","task_type":"echo","payload":{"n":1}}"#,
        r#"{"task_id":"dash-2","task_type":"fail","payload":{"message":"boom"}}"#,
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_worker"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TASK_DATA", task)
            .env("WORKER_LOG_FORMAT", "json")
            .arg("run")
            .output()
            .expect("run the worker");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        for line in text.lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            key_paths(&v, "", &mut paths);
            if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
                messages.insert(m.to_owned());
            }
        }
    }
    assert!(messages.contains("task succeeded") && messages.contains("task did not succeed"));

    // Message texts the two runs cannot produce (they need a queue) must be
    // tracing messages in the source, word for word.
    let mut source = String::new();
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")).expect("src")
    {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            source += &std::fs::read_to_string(path).expect("source");
        }
    }

    let dashboard = Bicep::load("infra/modules/dashboard.bicep");
    let queries: Vec<(&String, &str)> = dashboard
        .vars
        .iter()
        .filter(|(name, _)| name.ends_with("Query"))
        .map(|(name, v)| (name, v.template().expect("query text")))
        .collect();
    assert!(queries.len() >= 5, "the dashboard has its queries");
    let mut checked = 0;
    for (name, query) in &queries {
        // The messages it selects; those the two runs cannot produce (they
        // need a queue: `queue depth`, `outbox depth`, ...) must be tracing
        // messages in the source, word for word, and the fields that call
        // logs count as fields of its line: the runs show that JSON lines
        // carry an event's fields at the top level (`duration_ms`, `status`).
        let mut selected = Vec::new();
        let marker = "tostring(log.message) in (";
        if let Some(at) = query.find(marker) {
            let rest = &query[at + marker.len()..];
            let list = &rest[..rest.find(')').expect("closed list")];
            selected.extend(list.split(',').map(|t| t.trim().trim_matches('"')));
        }
        let mut source_fields: Option<BTreeSet<String>> = None;
        for text in &selected {
            if messages.contains(*text) {
                continue;
            }
            let fields = fields_logged_with(&source, text)
                .unwrap_or_else(|| panic!("{name}: the worker never logs {text:?}"));
            // Only fields every selected source-only message logs.
            source_fields = Some(match source_fields {
                None => fields,
                Some(seen) => seen.intersection(&fields).cloned().collect(),
            });
            checked += 1;
        }
        assert!(
            paths.contains("duration_ms") && paths.contains("status"),
            "JSON lines carry the event's fields at the top level ({paths:?})"
        );
        // Every `log.<path>` is a field the binary writes.
        for (i, _) in query.match_indices("log.") {
            let before = query[..i].chars().last().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' {
                continue;
            }
            let field: String = query[i + 4..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            let field = field.trim_end_matches('.');
            assert!(
                paths.contains(field) || source_fields.as_ref().is_some_and(|f| f.contains(field)),
                "{name}: log.{field} is not a field of the worker's JSON lines ({paths:?}) \
                 nor of every source-only message it selects ({source_fields:?})"
            );
            checked += 1;
        }
        checked += selected.len();
    }
    assert!(checked > 10, "only {checked} references checked");
    // The depth chart's lines: both messages log the queue's name and its depth.
    for text in ["queue depth", "outbox depth"] {
        let fields = fields_logged_with(&source, text).expect(text);
        assert!(
            fields.contains("queue") && fields.contains("depth"),
            "{text}: {fields:?}"
        );
        assert!(
            queries
                .iter()
                .any(|(_, q)| q.contains(&format!("\"{text}\""))),
            "the dashboard charts {text:?}"
        );
    }

    // The cost estimate: every placeholder replaced, by the size and prices
    // both deployments pass in.
    let cost = dashboard.var("costQuery").template().expect("costQuery");
    let priced = format!("{:?}", dashboard.var("costQueryPriced"));
    for placeholder in [
        "__VCPU__",
        "__GB__",
        "__PRICE_VCPU_SECOND__",
        "__PRICE_GB_SECOND__",
    ] {
        assert!(cost.contains(placeholder), "costQuery uses {placeholder}");
        assert!(
            priced.contains(placeholder),
            "costQueryPriced replaces {placeholder}"
        );
    }
    let executions = dashboard
        .var("executionsQuery")
        .template()
        .expect("executionsQuery");
    assert!(format!("{:?}", dashboard.var("executionsQueryForJob")).contains("__JOB_NAME__"));
    // The environment logs to the legacy destination, whose system table is
    // ContainerAppSystemLogs_CL with _s columns.
    let job = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/containerapps/job.bicep"),
    )
    .expect("job.bicep");
    assert!(job.contains("destination: 'log-analytics'"));
    assert!(executions.contains("ContainerAppSystemLogs_CL\n| where JobName_s == \"__JOB_NAME__\""));

    // The lines come from the tables both paths write, with the same columns
    // the READMEs' queries use; both deployments include the dashboard.
    let lines = dashboard.var("linesQuery").template().expect("linesQuery");
    assert!(lines.contains("ContainerInstanceLog_CL | project TimeGenerated, Line = Message"));
    assert!(lines.contains("ContainerInstanceLog | project TimeGenerated, Line = Message"));
    assert!(
        lines.contains("by Line"),
        "a line in two tables counts once"
    );
    assert!(lines.contains("ContainerAppConsoleLogs_CL | project TimeGenerated, Line = Log_s"));
    for file in ["infra/aci/main.bicep", "infra/containerapps/main.bicep"] {
        let main = Bicep::load(file);
        assert_eq!(
            main.module("../modules/dashboard.bicep")
                .body
                .at(&["params", "workspaceId"]),
            &Value::Expr("monitoring.outputs.workspaceId".into()),
            "{file}"
        );
        let params = main
            .module("../modules/dashboard.bicep")
            .body
            .at(&["params"])
            .clone();
        for (param, expr) in [
            ("vcpuCores", "cpuCores"),
            ("memoryInGb", "memoryInGb"),
            ("pricePerVcpuSecond", "pricePerVcpuSecond"),
            ("pricePerGbSecond", "pricePerGbSecond"),
        ] {
            assert_eq!(
                params.at(&[param]),
                &Value::Expr(expr.into()),
                "{file}: {param}"
            );
            assert!(main.params.contains_key(expr), "{file}: {expr}");
        }
        let job = params.get("jobName");
        if file.contains("containerapps") {
            assert_eq!(job, Some(&Value::Expr("jobName".into())), "{file}");
        } else {
            assert!(job.is_none(), "{file}: ACI has no job");
        }
    }
}
