"""What Azure itself checks, checked offline: resource bodies against Microsoft's API models.

    check FILE...      check every resource body of the Bicep files
    self-test DIR      every *.bicep in DIR must fail with the findings its
                       `// expect: <text>` lines name (each text must appear in
                       one finding), and nothing else may pass

Resource bodies come from the Bicep as written (tree-sitter-bicep). A literal
is checked; an expression (a parameter, a function call, a property of
another resource) is opaque and passes, except that a bare reference to a
`var` is followed, and both branches of `cond ? a : b` are checked.

1. ARM resource bodies. Each `resource` (not `existing`) names a type and an
   API version. MODELS maps that pair to the model class Microsoft generates
   from the same REST specification into its management SDK on PyPI (pinned
   in .ci/lint-requirements.txt): the class lists every property with its wire
   name, nesting (`properties.x` flattened into the class), type, read-only
   and required flags, enum and limits, and the subclasses a discriminator
   (`odata.type`, `criterionType`) picks. Unknown or misspelt properties,
   read-only ones, wrong nesting or type, a missing required property and an
   enum value the model does not list fail. A type/version pair that is in
   neither MODELS nor UNMODELLED fails too, so a new resource or API version
   cannot slip past: add its model first. The body of a Logic App HTTP `PUT`
   to an ARM URL (`.../providers/<type>/<name>?api-version=<v>`) is a
   resource body too and is checked the same way; every ARM URL a workflow
   calls must name a pair in MODELS.

2. Logic App workflow definitions (`properties.definition` of
   Microsoft.Logic/workflows) against the Workflow Definition Language:
   "Schema reference guide for trigger and action types in Azure Logic Apps"
   (learn.microsoft.com/azure/logic-apps/logic-apps-workflow-actions-triggers)
   and "Handle errors and exceptions in Azure Logic Apps", section "Retry
   policies" (logic-apps-exception-handling): known trigger and action types
   and their attributes, the inputs each type requires, `retryPolicy` inside
   `inputs` with a documented type, count and intervals, `runAfter` naming
   actions of the same scope with the statuses Succeeded, Failed, Skipped,
   TimedOut and no cycle, `runtimeConfiguration` and `operationOptions` from
   the documented lists and where they apply, `limit.timeout` as an ISO 8601
   duration, unique action names, and every `body('X')`, `outputs('X')`,
   `actions('X')`, `items('X')`, `variables('x')` and `parameters('x')` in an
   expression naming something the definition has.

Runs inside the lint venv (.ci/lint-infra).
"""

import copy
import difflib
import enum
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

# ---------------------------------------------------------------------------
# Which model answers for which resource type and API version.
#
# Every pair is the exact API version of the template, except where a note
# says otherwise: no SDK release on PyPI carries that API version's models,
# and the nearest one was compared property by property with the version the
# template uses (Azure/bicep-types-az, generated/<rp>/<namespace>/<version>/
# types.md, which is generated from the same REST specification).

MODELS = {
    "Microsoft.App/jobs@2025-01-01": ("azure.mgmt.appcontainers.models", "Job", ""),
    "Microsoft.App/managedEnvironments@2025-01-01": (
        "azure.mgmt.appcontainers.models",
        "ManagedEnvironment",
        "",
    ),
    "Microsoft.Authorization/roleAssignments@2022-04-01": (
        "azure.mgmt.authorization.v2022_04_01.models",
        "RoleAssignmentCreateParameters",
        "",
    ),
    "Microsoft.Authorization/roleDefinitions@2022-04-01": (
        "azure.mgmt.authorization.v2022_04_01.models",
        "RoleDefinition",
        "",
    ),
    "Microsoft.Consumption/budgets@2023-05-01": (
        "azure.mgmt.consumption.models",
        "Budget",
        "azure-mgmt-consumption 10.0.0 carries 2021-10-01, 11.0.0 carries 2024-08-01 (in a "
        "model format this check does not read); Budget, BudgetTimePeriod and Notification "
        "of 2021-10-01 list the same properties as 2023-05-01",
    ),
    "Microsoft.ContainerInstance/containerGroups@2023-05-01": (
        "azure.mgmt.containerinstance.models",
        "ContainerGroup",
        "",
    ),
    "Microsoft.ContainerRegistry/registries@2023-07-01": (
        "azure.mgmt.containerregistry.v2023_07_01.models",
        "Registry",
        "",
    ),
    "Microsoft.Insights/actionGroups@2023-01-01": (
        "azure.mgmt.monitor.v2023_01_01.models",
        "ActionGroupResource",
        "",
    ),
    "Microsoft.Insights/diagnosticSettings@2021-05-01-preview": (
        "azure.mgmt.monitor.v2021_05_01_preview.models",
        "DiagnosticSettingsResource",
        "",
    ),
    "Microsoft.Insights/metricAlerts@2018-03-01": (
        "azure.mgmt.monitor.v2018_03_01.models",
        "MetricAlertResource",
        "",
    ),
    "Microsoft.Insights/scheduledQueryRules@2022-06-15": (
        "azure.mgmt.monitor.v2022_08_01_preview.models",
        "ScheduledQueryRuleResource",
        "no azure-mgmt-monitor release carries 2022-06-15; 2022-08-01-preview is the next "
        "version and adds properties (ruleResolveConfiguration, publicNetworkAccess) this "
        "template does not set",
    ),
    "Microsoft.Insights/workbooks@2023-06-01": (
        "azure.mgmt.applicationinsights.v2023_06_01.models",
        "Workbook",
        "",
    ),
    "Microsoft.KeyVault/vaults@2023-07-01": (
        "azure.mgmt.keyvault.v2023_07_01.models",
        "VaultCreateOrUpdateParameters",
        "",
    ),
    "Microsoft.KeyVault/vaults/secrets@2023-07-01": (
        "azure.mgmt.keyvault.v2023_07_01.models",
        "SecretCreateOrUpdateParameters",
        "",
    ),
    "Microsoft.Logic/workflows@2019-05-01": ("azure.mgmt.logic.models", "Workflow", ""),
    "Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31": (
        "azure.mgmt.msi.v2023_01_31.models",
        "Identity",
        "",
    ),
    "Microsoft.OperationalInsights/workspaces@2022-10-01": (
        "azure.mgmt.loganalytics.models",
        "Workspace",
        "azure-mgmt-loganalytics 13.0.0b6, the release that carries 2022-10-01",
    ),
    "Microsoft.Storage/storageAccounts@2023-05-01": (
        "azure.mgmt.storage.v2023_05_01.models",
        "StorageAccountCreateParameters",
        "",
    ),
    "Microsoft.Storage/storageAccounts/queueServices@2023-05-01": (
        "azure.mgmt.storage.v2023_05_01.models",
        "QueueServiceProperties",
        "",
    ),
    "Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01": (
        "azure.mgmt.storage.v2023_05_01.models",
        "StorageQueue",
        "",
    ),
}

# Types no management SDK on PyPI models; their bodies are not checked.
UNMODELLED = {
    "Microsoft.Web/connections@2016-06-01": (
        "API connections live in the Logic Apps part of the Microsoft.Web specification, "
        "which no azure-mgmt-web release generates"
    ),
}

# Keys of a resource declaration that are Bicep's, not the body's.
BICEP_KEYS = {"name", "parent", "scope", "dependsOn"}

PRIMITIVES = {
    "str": "string",
    "int": "int",
    "long": "int",
    "float": "number",
    "bool": "bool",
    "object": "any",
    "iso-8601": "string",
    "rfc-1123": "string",
    "duration": "string",
    "date": "string",
    "time": "string",
    "unix-time": "int",
    "bytearray": "string",
    "base64": "string",
}

# ---------------------------------------------------------------------------
# Bicep values.


class V:
    """A Bicep value: obj (items: [(key, V)]), arr (items: [V]), str, num,
    bool, null, expr (opaque), alt (options: [V], either may be the value)."""

    def __init__(self, kind, line, items=None, text=None, interpolated=False):
        self.kind = kind
        self.line = line
        self.items = items if items is not None else []
        self.text = text
        self.interpolated = interpolated

    def get(self, key):
        if self.kind != "obj":
            return None
        for k, v in self.items:
            if k == key:
                return v
        return None

    def keys(self):
        return [k for k, _ in self.items] if self.kind == "obj" else []

    def literal(self):
        return self.text if self.kind == "str" and not self.interpolated else None


class BicepFile:
    def __init__(self, path):
        import tree_sitter
        import tree_sitter_bicep

        self.path = str(path)
        self.src = Path(path).read_bytes()
        parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))
        self.root = parser.parse(self.src).root_node
        self.var_nodes = {}
        self.resources = []  # (symbol, type, existing, body node, line)
        for decl in self.root.named_children:
            if decl.type == "variable_declaration":
                name = self._first(decl, "identifier")
                value = self._after_equals(decl)
                if name is not None and value is not None:
                    self.var_nodes[self.text(name)] = value
            elif decl.type == "resource_declaration":
                symbol = self._first(decl, "identifier")
                ty = self._first(decl, "string")
                body = self._after_equals(decl)
                if symbol is None or ty is None or body is None:
                    continue
                existing = any(c.type == "existing" for c in decl.children)
                self.resources.append(
                    (self.text(symbol), self.value(ty).text, existing, self._unwrap(body), decl.start_point[0] + 1)
                )
        self._resolving = set()

    def text(self, node):
        return self.src[node.start_byte : node.end_byte].decode()

    @staticmethod
    def _first(node, kind):
        return next((c for c in node.named_children if c.type == kind), None)

    @staticmethod
    def _after_equals(node):
        seen = False
        for child in node.children:
            if seen and child.is_named and child.type != "comment":
                return child
            seen = seen or child.type == "="
        return None

    def _unwrap(self, node):
        if node.type == "for_statement":
            named = [c for c in node.named_children if c.type != "comment"]
            return self._unwrap(named[-1])
        if node.type == "if_statement":
            named = [c for c in node.named_children if c.type != "comment"]
            return self._unwrap(named[-1])
        return node

    def var(self, name):
        node = self.var_nodes.get(name)
        if node is None or name in self._resolving:
            return None
        self._resolving.add(name)
        try:
            return self.value(node)
        finally:
            self._resolving.discard(name)

    def value(self, node):
        line = node.start_point[0] + 1
        kind = node.type
        if kind == "string":
            out, interpolated = [], False
            for part in node.children:
                t = self.text(part)
                if part.type == "string_content":
                    out.append(t)
                elif part.type == "escape_sequence":
                    out.append({"\\n": "\n", "\\r": "\r", "\\t": "\t"}.get(t, t[1:]))
                elif part.type == "interpolation":
                    interpolated = True
                    out.append(t)
            return V("str", line, text="".join(out), interpolated=interpolated)
        if kind == "number":
            try:
                return V("num", line, text=int(self.text(node)))
            except ValueError:
                return V("expr", line, text=self.text(node))
        if kind == "boolean":
            return V("bool", line, text=self.text(node) == "true")
        if kind == "null":
            return V("null", line)
        if kind == "array":
            return V("arr", line, items=[self.value(c) for c in node.named_children if c.type != "comment"])
        if kind == "for_statement":
            # One item standing for every item the loop makes.
            return V("arr", line, items=[self.value(self._unwrap(node))])
        if kind == "object":
            items = []
            for prop in node.named_children:
                if prop.type != "object_property":
                    continue
                parts = [c for c in prop.named_children if c.type != "comment"]
                key_node = parts[0]
                key = self.value(key_node).text if key_node.type == "string" else self.text(key_node)
                items.append((key, self.value(parts[-1])))
            return V("obj", line, items=items)
        if kind == "ternary_expression":
            parts = [c for c in node.named_children if c.type != "comment"]
            return V("alt", line, items=[self.value(parts[1]), self.value(parts[2])])
        if kind == "parenthesized_expression":
            inner = [c for c in node.named_children if c.type != "comment"]
            if len(inner) == 1:
                return self.value(inner[0])
        if kind == "identifier":
            resolved = self.var(self.text(node))
            if resolved is not None:
                # Findings point at the use, not at the var.
                used = copy.copy(resolved)
                used.line = line
                return used
        return V("expr", line, text=self.text(node))

    def interpolate(self, text):
        """A string's text with `${var}` replaced by the var's literal text, where it has one."""

        def sub(m):
            v = self.var(m.group(1))
            if v is not None and v.kind == "str":
                return self.interpolate(v.text)
            return m.group(0)

        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, text)


# ---------------------------------------------------------------------------
# Models.


def _split_key(key):
    """`properties.osType` -> [properties, osType]; `odata\\.type` stays one key."""
    return [part.replace("\\.", ".") for part in re.split(r"(?<!\\)\.", key)]


class Field:
    def __init__(self, pyname, wire, typ, validation, enum_cls):
        self.pyname = pyname
        self.wire = wire
        self.type = typ
        self.validation = validation
        self.enum = enum_cls

    @property
    def required(self):
        return bool(self.validation.get("required"))

    @property
    def readonly(self):
        return bool(self.validation.get("readonly"))


class Schema:
    """The wire shape of a model class: wire key -> Field or nested dict."""

    def __init__(self, module, cls):
        self.module = module
        self.cls = cls
        self.tree = {}
        self.extra = False
        annotations = {}
        try:
            annotations = {n: p.annotation for n, p in inspect.signature(cls.__init__).parameters.items()}
        except (TypeError, ValueError):
            pass
        validation = getattr(cls, "_validation", {}) or {}
        for pyname, spec in (getattr(cls, "_attribute_map", {}) or {}).items():
            if spec["key"] == "":
                self.extra = True
                continue
            path = _split_key(spec["key"])
            node = self.tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break
            else:
                node[path[-1]] = Field(
                    pyname, path[-1], spec["type"], validation.get(pyname, {}), self._enum(annotations.get(pyname))
                )

    def _enum(self, annotation):
        if annotation is None or annotation is inspect.Parameter.empty:
            return None
        for name in re.findall(r"_models\.(\w+)", str(annotation)):
            candidate = getattr(self.module, name, None)
            if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
                return candidate
        return None

    def discriminator(self):
        """(wire key, {value: subclass name}) of a polymorphic model, or None."""
        subtypes = getattr(self.cls, "_subtype_map", None) or {}
        for pyname, mapping in subtypes.items():
            spec = self.cls._attribute_map.get(pyname)
            if spec:
                return _split_key(spec["key"])[-1], mapping
        return None


class Checker:
    def __init__(self):
        self.findings = []
        self._schemas = {}

    def fail(self, file, line, path, message):
        self.findings.append(f"{file}:{line}: {path}: {message}")

    # -- models --------------------------------------------------------------

    def schema(self, module, name):
        key = (module.__name__, name)
        if key not in self._schemas:
            cls = getattr(module, name, None)
            self._schemas[key] = Schema(module, cls) if cls is not None else None
        return self._schemas[key]

    def check_resource(self, bf, symbol, rtype, body, line):
        if rtype in UNMODELLED:
            return
        entry = MODELS.get(rtype)
        if entry is None:
            self.fail(
                bf.path,
                line,
                symbol,
                f"no API model for {rtype}: add the SDK package and the model to MODELS in .ci/api_models.py "
                f"(or, if no SDK has one, to UNMODELLED with the reason)",
            )
            return
        module_name, class_name, _note = entry
        module = importlib.import_module(module_name)
        schema = self.schema(module, class_name)
        if schema is None:
            self.fail(bf.path, line, symbol, f"{module_name} has no {class_name}")
            return
        ctx = (bf, rtype)
        self.check_object(ctx, body, schema, symbol, top=True)
        if rtype.startswith("Microsoft.Logic/workflows@"):
            definition = body.get("properties") and body.get("properties").get("definition")
            if definition is not None and definition.kind == "obj":
                WorkflowCheck(self, bf, f"{symbol}.properties.definition").check(definition)

    def check_value(self, ctx, v, typ, schema_module, path):
        bf, _ = ctx
        if v.kind == "expr":
            return
        if v.kind == "alt":
            for option in v.items:
                self.check_value(ctx, option, typ, schema_module, path)
            return
        if typ.startswith("[") and typ.endswith("]"):
            if v.kind != "arr":
                self.fail(bf.path, v.line, path, f"expected an array of {typ[1:-1]}, found {describe(v)}")
                return
            for i, item in enumerate(v.items):
                self.check_value(ctx, item, typ[1:-1], schema_module, f"{path}[{i}]")
            return
        if typ.startswith("{") and typ.endswith("}"):
            if v.kind != "obj":
                self.fail(bf.path, v.line, path, f"expected an object of {typ[1:-1]} values, found {describe(v)}")
                return
            for key, item in v.items:
                self.check_value(ctx, item, typ[1:-1], schema_module, f"{path}.{key}")
            return
        if typ in PRIMITIVES:
            want = PRIMITIVES[typ]
            if want == "any" or v.kind == "null":
                return
            ok = {
                "string": v.kind == "str",
                "int": v.kind == "num",
                "number": v.kind == "num",
                "bool": v.kind == "bool",
            }[want]
            if not ok:
                self.fail(bf.path, v.line, path, f"expected {want}, found {describe(v)}")
            return
        schema = self.schema(schema_module, typ)
        if schema is None:
            return
        self.check_object(ctx, v, schema, path)

    def check_object(self, ctx, v, schema, path, top=False):
        bf, _ = ctx
        if v.kind in ("expr", "null"):
            return
        if v.kind == "alt":
            for option in v.items:
                self.check_object(ctx, option, schema, path, top)
            return
        if v.kind != "obj":
            self.fail(bf.path, v.line, path, f"expected an object ({schema.cls.__name__}), found {describe(v)}")
            return
        disc = schema.discriminator()
        if disc is not None:
            wire, mapping = disc
            given = v.get(wire)
            if given is None:
                self.fail(bf.path, v.line, path, f"missing required property '{wire}' (one of {sorted(mapping)})")
            elif given.literal() is not None:
                sub = mapping.get(given.literal())
                if sub is None:
                    self.fail(bf.path, given.line, f"{path}.{wire}", f"'{given.literal()}' is none of {sorted(mapping)}")
                else:
                    sub_schema = self.schema(schema.module, sub)
                    if sub_schema is not None:
                        schema = sub_schema
        self.check_tree(ctx, v, schema.tree, schema, path, top)

    def check_tree(self, ctx, v, tree, schema, path, top=False):
        bf, _ = ctx
        if v.kind in ("expr", "null"):
            return
        if v.kind != "obj":
            self.fail(bf.path, v.line, path, f"expected an object, found {describe(v)}")
            return
        for key, item in v.items:
            where = f"{path}.{key}"
            if top and key in BICEP_KEYS:
                continue
            node = tree.get(key)
            if node is None:
                if schema.extra:
                    continue
                self.fail(bf.path, item.line, where, unknown(key, tree, schema))
                continue
            if isinstance(node, dict):
                self.check_tree(ctx, item, node, schema, where)
                continue
            if node.readonly:
                self.fail(bf.path, item.line, where, f"read-only in {schema.cls.__name__}: Azure sets it")
                continue
            self.check_value(ctx, item, node.type, schema.module, where)
            self.check_constraints(bf, item, node, where)
        missing = [
            k
            for k, node in tree.items()
            if k not in v.keys() and not (top and k in BICEP_KEYS) and requires(node)
        ]
        for k in missing:
            self.fail(bf.path, v.line, path, f"missing required property '{k}' ({schema.cls.__name__})")

    def check_constraints(self, bf, v, field, path):
        rules = field.validation
        if v.kind == "str" and not v.interpolated:
            if field.enum is not None:
                allowed = [m.value for m in field.enum]
                if v.text.lower() not in {str(a).lower() for a in allowed}:
                    self.fail(bf.path, v.line, path, f"'{v.text}' is none of {allowed}")
            if "max_length" in rules and len(v.text) > rules["max_length"]:
                self.fail(bf.path, v.line, path, f"longer than {rules['max_length']} characters")
            if "min_length" in rules and len(v.text) < rules["min_length"]:
                self.fail(bf.path, v.line, path, f"shorter than {rules['min_length']} characters")
            if "pattern" in rules and not re.search(rules["pattern"], v.text):
                self.fail(bf.path, v.line, path, f"does not match {rules['pattern']}")
        if v.kind == "num":
            if "maximum" in rules and v.text > rules["maximum"]:
                self.fail(bf.path, v.line, path, f"above the maximum {rules['maximum']}")
            if "minimum" in rules and v.text < rules["minimum"]:
                self.fail(bf.path, v.line, path, f"below the minimum {rules['minimum']}")
        if v.kind == "arr":
            if "max_items" in rules and len(v.items) > rules["max_items"]:
                self.fail(bf.path, v.line, path, f"more than {rules['max_items']} items")
            if rules.get("min_items") and len(v.items) < rules["min_items"]:
                self.fail(bf.path, v.line, path, f"fewer than {rules['min_items']} items")

    # -- Logic App requests to ARM -------------------------------------------

    def check_arm_request(self, bf, action_path, inputs):
        uri = inputs.get("uri")
        if uri is None or uri.kind != "str":
            return
        text = bf.interpolate(uri.text)
        m = re.search(r"/providers/([^?]+)\?(?:[^#]*&)?api-version=([0-9A-Za-z-]+)", text)
        if m is None or "${" in m.group(2):
            return
        segments = [s for s in m.group(1).split("/") if s]
        if len(segments) < 2:
            return
        # namespace/type/name/type/name...: the types, not the names.
        types = [segments[0], segments[1]] + segments[3::2]
        if len(segments) % 2 == 1 and len(segments) > 3:
            types = types[:-1]  # a trailing action (`.../stop`)
        rtype = "/".join(types) + "@" + m.group(2)
        method = (inputs.get("method").literal() or "").upper() if inputs.get("method") else ""
        if rtype not in MODELS and rtype not in UNMODELLED:
            self.fail(bf.path, uri.line, f"{action_path}.inputs.uri", f"no API model for {rtype} (see MODELS)")
            return
        body = inputs.get("body")
        if method == "PUT" and body is not None and rtype in MODELS:
            module_name, class_name, _ = MODELS[rtype]
            schema = self.schema(importlib.import_module(module_name), class_name)
            self.check_object((bf, rtype), body, schema, f"{action_path}.inputs.body", top=True)


def requires(node):
    if isinstance(node, Field):
        return node.required and not node.readonly
    return any(requires(child) for child in node.values())


def describe(v):
    return {
        "obj": "an object",
        "arr": "an array",
        "str": "a string",
        "num": "a number",
        "bool": "a boolean",
        "null": "null",
    }.get(v.kind, v.kind)


def unknown(key, tree, schema):
    known = sorted(k for k, node in tree.items() if not (isinstance(node, Field) and node.readonly))
    same_case = [k for k in known if k.lower() == key.lower()]
    if same_case:
        return f"unknown property '{key}': the API spells it '{same_case[0]}'"
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = schema.cls.__name__
    return f"unknown property '{key}' in {where}{hint}; known: {', '.join(known)}"


# ---------------------------------------------------------------------------
# The Workflow Definition Language.

STATUSES = {"Succeeded", "Failed", "Skipped", "TimedOut"}
FREQUENCIES = {"second", "minute", "hour", "day", "week", "month"}
PARAMETER_TYPES = {"array", "bool", "float", "int", "object", "secureobject", "securestring", "string"}
VARIABLE_TYPES = {"array", "boolean", "float", "integer", "object", "string"}
PREDICATES = {
    "and",
    "or",
    "not",
    "equals",
    "greater",
    "greaterorequals",
    "less",
    "lessorequals",
    "contains",
    "startswith",
    "endswith",
}
DEFINITION_KEYS = {"$schema", "contentVersion", "parameters", "triggers", "actions", "outputs", "staticResults"}
TRIGGER_KEYS = {
    "type",
    "kind",
    "inputs",
    "recurrence",
    "conditions",
    "runtimeConfiguration",
    "splitOn",
    "splitOnConfiguration",
    "operationOptions",
    "correlation",
    "limit",
    "description",
    "metadata",
}
ACTION_KEYS = {
    "type",
    "kind",
    "inputs",
    "runAfter",
    "runtimeConfiguration",
    "operationOptions",
    "limit",
    "trackedProperties",
    "description",
    "metadata",
}
# Action type (lower case) -> (extra attributes, required attributes,
# required inputs, allowed inputs or None for any).
ACTION_TYPES = {
    "http": (set(), {"inputs"}, {"method", "uri"}, {"method", "uri", "headers", "queries", "body", "authentication", "retryPolicy", "cookie"}),
    "apiconnection": (set(), {"inputs"}, {"host", "method", "path"}, {"host", "method", "path", "headers", "queries", "body", "authentication", "retryPolicy"}),
    "httpwebhook": (set(), {"inputs"}, {"subscribe"}, None),
    "apiconnectionwebhook": (set(), {"inputs"}, {"host"}, None),
    "function": (set(), {"inputs"}, {"function"}, None),
    "workflow": (set(), {"inputs"}, {"host"}, None),
    "response": (set(), {"inputs"}, {"statusCode"}, {"statusCode", "headers", "body", "schema"}),
    "compose": (set(), {"inputs"}, set(), None),
    "parsejson": (set(), {"inputs"}, {"content", "schema"}, {"content", "schema"}),
    "query": (set(), {"inputs"}, {"from", "where"}, {"from", "where"}),
    "select": (set(), {"inputs"}, {"from", "select"}, {"from", "select"}),
    "table": (set(), {"inputs"}, {"from", "format"}, {"from", "format", "columns"}),
    "join": (set(), {"inputs"}, {"from", "joinWith"}, {"from", "joinWith"}),
    "initializevariable": (set(), {"inputs"}, {"variables"}, {"variables"}),
    "setvariable": (set(), {"inputs"}, {"name", "value"}, {"name", "value"}),
    "incrementvariable": (set(), {"inputs"}, {"name"}, {"name", "value"}),
    "decrementvariable": (set(), {"inputs"}, {"name"}, {"name", "value"}),
    "appendtoarrayvariable": (set(), {"inputs"}, {"name", "value"}, {"name", "value"}),
    "appendtostringvariable": (set(), {"inputs"}, {"name", "value"}, {"name", "value"}),
    "terminate": (set(), {"inputs"}, {"runStatus"}, {"runStatus", "runError"}),
    "wait": (set(), {"inputs"}, set(), {"interval", "until"}),
    "if": ({"expression", "actions", "else"}, {"expression", "actions"}, None, None),
    "switch": ({"expression", "cases", "default"}, {"expression", "cases"}, None, None),
    "scope": ({"actions"}, {"actions"}, None, None),
    "foreach": ({"foreach", "actions"}, {"foreach", "actions"}, None, None),
    "until": ({"expression", "actions"}, {"expression", "actions", "limit"}, None, None),
}
RETRYING_TYPES = {"http", "apiconnection", "httpwebhook", "apiconnectionwebhook", "function", "workflow"}
TRIGGER_TYPES = {"recurrence", "http", "httpwebhook", "request", "apiconnection", "apiconnectionwebhook", "slidingwindow"}
# Operation options and where the reference allows them.
OPERATION_OPTIONS = {
    "DisableAsyncPattern": ("action", {"http", "apiconnection", "response"}),
    "IncludeAuthorizationHeadersInOutputs": ("trigger", {"request", "httpwebhook"}),
    "Sequential": ("action", {"foreach"}),
    "SingleInstance": ("trigger", None),
    "SuppressWorkflowHeaders": ("action", {"http", "function"}),
    "SuppressWorkflowHeadersOnResponse": ("trigger", {"request", "httpwebhook"}),
}
RUNTIME_KEYS = {"concurrency", "paginationPolicy", "secureData", "staticResult", "contentTransfer"}
REFERENCE = re.compile(r"\b(body|outputs|actions|items|variables|parameters|result|iterationIndexes)\(\s*'((?:[^']|'')*)'\s*\)")
DURATION = re.compile(r"^P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$")


def duration_secs(text):
    m = DURATION.match(text)
    if not m:
        return None
    y, mo, w, d, _, h, mi, s, _ = m.groups()
    n = lambda g: float(g[:-1]) if g else 0.0  # noqa: E731
    return n(y) * 365 * 86400 + n(mo) * 30 * 86400 + n(w) * 7 * 86400 + n(d) * 86400 + n(h) * 3600 + n(mi) * 60 + n(s)


class WorkflowCheck:
    def __init__(self, checker, bf, path):
        self.c = checker
        self.bf = bf
        self.path = path
        self.names = {}  # action name -> type (lower)
        self.variables = set()
        self.parameters = set()
        self.strings = []  # (path, V) of every string literal

    def fail(self, v, path, message):
        self.c.fail(self.bf.path, v.line, path, message)

    def keys_within(self, v, allowed, path, what):
        for key, item in v.items:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.fail(item, f"{path}.{key}", f"not an attribute of {what}{hint}; allowed: {', '.join(sorted(allowed))}")

    def check(self, definition):
        p = self.path
        self.keys_within(definition, DEFINITION_KEYS, p, "a workflow definition")
        params = definition.get("parameters")
        if params is not None and params.kind == "obj":
            for name, spec in params.items:
                self.parameters.add(name)
                if spec.kind != "obj":
                    continue
                self.keys_within(spec, {"type", "defaultValue", "allowedValues", "metadata"}, f"{p}.parameters.{name}", "a parameter")
                ty = spec.get("type")
                if ty is None:
                    self.fail(spec, f"{p}.parameters.{name}", "a parameter needs a type")
                elif ty.literal() is not None and ty.literal().lower() not in PARAMETER_TYPES:
                    self.fail(ty, f"{p}.parameters.{name}.type", f"'{ty.literal()}' is no parameter type")
        triggers = definition.get("triggers")
        if triggers is None or triggers.kind != "obj" or not triggers.items:
            self.fail(definition, p, "a workflow definition needs a trigger")
        else:
            for name, trigger in triggers.items:
                self.names[name] = "trigger"
                self.trigger(name, trigger, f"{p}.triggers.{name}")
        actions = definition.get("actions")
        if actions is not None:
            self.collect(actions, f"{p}.actions")
            self.actions(actions, f"{p}.actions")
        self.references(definition, p)

    # Every action name in the definition, and every variable it initializes.
    def collect(self, actions, path):
        if actions.kind != "obj":
            return
        for name, action in actions.items:
            if action.kind != "obj":
                continue
            if name in self.names:
                self.fail(action, f"{path}.{name}", "action names must be unique in a workflow")
            ty = action.get("type")
            self.names[name] = (ty.literal() or "").lower() if ty is not None else ""
            if self.names[name] == "initializevariable":
                inputs = action.get("inputs")
                variables = inputs.get("variables") if inputs is not None else None
                if variables is not None and variables.kind == "arr":
                    for var in variables.items:
                        n = var.get("name") if var.kind == "obj" else None
                        if n is not None and n.literal():
                            self.variables.add(n.literal())
            for nested in self.nested(action):
                self.collect(nested[1], f"{path}.{name}.{nested[0]}")

    @staticmethod
    def nested(action):
        """(relative path, actions) of each branch of a control action."""
        out = []
        if action.get("actions") is not None:
            out.append(("actions", action.get("actions")))
        otherwise = action.get("else")
        if otherwise is not None and otherwise.get("actions") is not None:
            out.append(("else.actions", otherwise.get("actions")))
        cases = action.get("cases")
        if cases is not None and cases.kind == "obj":
            for case_name, case in cases.items:
                if case.get("actions") is not None:
                    out.append((f"cases.{case_name}.actions", case.get("actions")))
        default = action.get("default")
        if default is not None and default.get("actions") is not None:
            out.append(("default.actions", default.get("actions")))
        return out

    def trigger(self, name, trigger, path):
        if trigger.kind != "obj":
            return
        self.keys_within(trigger, TRIGGER_KEYS, path, "a trigger")
        ty = trigger.get("type")
        kind = ty.literal().lower() if ty is not None and ty.literal() else None
        if ty is None:
            self.fail(trigger, path, "a trigger needs a type")
        elif kind is not None and kind not in TRIGGER_TYPES:
            self.fail(ty, f"{path}.type", f"'{ty.literal()}' is no trigger type ({', '.join(sorted(TRIGGER_TYPES))})")
        recurrence = trigger.get("recurrence")
        if kind in ("recurrence", "apiconnection", "http", "slidingwindow") and recurrence is None:
            self.fail(trigger, path, f"a {ty.literal()} trigger needs a recurrence")
        if recurrence is not None and recurrence.kind == "obj":
            self.keys_within(recurrence, {"frequency", "interval", "startTime", "timeZone", "schedule"}, f"{path}.recurrence", "a recurrence")
            freq = recurrence.get("frequency")
            if freq is None or recurrence.get("interval") is None:
                self.fail(recurrence, f"{path}.recurrence", "a recurrence needs frequency and interval")
            elif freq.literal() is not None and freq.literal().lower() not in FREQUENCIES:
                self.fail(freq, f"{path}.recurrence.frequency", f"'{freq.literal()}' is no frequency")
        if kind == "apiconnection":
            self.inputs_of(trigger, "apiconnection", path)
        if trigger.get("retryPolicy") is not None:
            self.fail(trigger.get("retryPolicy"), f"{path}.retryPolicy", "retryPolicy belongs inside inputs")
        self.runtime(trigger, path, "trigger", kind)
        self.operation_options(trigger, path, "trigger", kind)

    def actions(self, actions, path):
        if actions.kind != "obj":
            if actions.kind not in ("expr", "alt"):
                self.fail(actions, path, "actions must be an object of named actions")
            return
        names = set(actions.keys())
        graph = {}
        for name, action in actions.items:
            where = f"{path}.{name}"
            if action.kind != "obj":
                continue
            self.action(name, action, where)
            after = action.get("runAfter")
            graph[name] = set()
            if after is None:
                continue
            if after.kind != "obj":
                self.fail(after, f"{where}.runAfter", "runAfter must be an object")
                continue
            for prev, statuses in after.items:
                if prev not in names:
                    where_else = "another scope" if prev in self.names else "nowhere"
                    self.fail(statuses, f"{where}.runAfter.{prev}", f"runAfter names '{prev}', which is in {where_else}: it must be an action of the same scope")
                else:
                    graph[name].add(prev)
                if statuses.kind != "arr" or not statuses.items:
                    if statuses.kind not in ("expr", "alt"):
                        self.fail(statuses, f"{where}.runAfter.{prev}", "a non-empty array of statuses")
                    continue
                for status in statuses.items:
                    if status.literal() is not None and status.literal() not in STATUSES:
                        close = difflib.get_close_matches(status.literal(), sorted(STATUSES), n=1)
                        hint = f" (did you mean '{close[0]}'?)" if close else ""
                        self.fail(status, f"{where}.runAfter.{prev}", f"'{status.literal()}' is no run status{hint}; allowed: {', '.join(sorted(STATUSES))}")
        # No cycle through runAfter.
        state = {}

        def visit(n, trail):
            if state.get(n) == 1:
                self.fail(actions, path, f"runAfter cycle: {' -> '.join(trail + [n])}")
                return
            if state.get(n) == 2:
                return
            state[n] = 1
            for prev in sorted(graph.get(n, ())):
                visit(prev, trail + [n])
            state[n] = 2

        for n in sorted(graph):
            visit(n, [])

    def action(self, name, action, path):
        ty = action.get("type")
        if ty is None:
            self.fail(action, path, "an action needs a type")
            return
        kind = ty.literal().lower() if ty.literal() else None
        if kind is None:
            return
        if kind not in ACTION_TYPES:
            self.fail(ty, f"{path}.type", f"'{ty.literal()}' is no action type this check knows ({', '.join(sorted(ACTION_TYPES))})")
            return
        extra, required, need_inputs, allowed_inputs = ACTION_TYPES[kind]
        allowed = ACTION_KEYS | extra
        if kind in ("if", "switch", "scope", "foreach", "until"):
            allowed = allowed - {"inputs"}
        if action.get("retryPolicy") is not None:
            self.fail(action.get("retryPolicy"), f"{path}.retryPolicy", "retryPolicy belongs inside inputs (\"Retry policies\", Logic Apps exception handling); beside them it is not the action's policy")
        self.keys_within(action, allowed | {"retryPolicy"}, path, f"a {ty.literal()} action")
        for key in sorted(required):
            if action.get(key) is None:
                self.fail(action, path, f"a {ty.literal()} action needs '{key}'")
        if need_inputs is not None:
            self.inputs_of(action, kind, path)
        if kind == "if":
            self.expression(action.get("expression"), f"{path}.expression")
            otherwise = action.get("else")
            if otherwise is not None and otherwise.kind == "obj":
                self.keys_within(otherwise, {"actions"}, f"{path}.else", "an else branch")
        if kind == "switch":
            cases = action.get("cases")
            seen = set()
            if cases is not None and cases.kind == "obj":
                for case_name, case in cases.items:
                    if case.kind != "obj":
                        continue
                    self.keys_within(case, {"case", "actions"}, f"{path}.cases.{case_name}", "a switch case")
                    value = case.get("case")
                    if value is None:
                        self.fail(case, f"{path}.cases.{case_name}", "a switch case needs 'case'")
                    elif value.kind in ("str", "num"):
                        if value.text in seen:
                            self.fail(value, f"{path}.cases.{case_name}.case", "two cases with one value")
                        seen.add(value.text)
            default = action.get("default")
            if default is not None and default.kind == "obj":
                self.keys_within(default, {"actions"}, f"{path}.default", "a switch default")
        if kind == "until":
            self.limit(action.get("limit"), f"{path}.limit", until=True)
        elif action.get("limit") is not None:
            self.limit(action.get("limit"), f"{path}.limit", until=False)
        self.runtime(action, path, "action", kind)
        self.operation_options(action, path, "action", kind)
        for rel, nested in self.nested(action):
            self.actions(nested, f"{path}.{rel}")
        if kind == "http":
            inputs = action.get("inputs")
            if inputs is not None and inputs.kind == "obj":
                self.c.check_arm_request(self.bf, path, inputs)

    def inputs_of(self, node, kind, path):
        _, _, need, allowed = ACTION_TYPES[kind]
        inputs = node.get("inputs")
        if inputs is None or inputs.kind != "obj":
            return
        where = f"{path}.inputs"
        if allowed is not None:
            self.keys_within(inputs, allowed, where, f"{kind} inputs")
        for key in sorted(need or ()):
            if inputs.get(key) is None:
                self.fail(inputs, where, f"{kind} inputs need '{key}'")
        policy = inputs.get("retryPolicy")
        if policy is not None:
            if kind not in RETRYING_TYPES:
                self.fail(policy, f"{where}.retryPolicy", f"a {kind} action has no retry policy")
            else:
                self.retry_policy(policy, f"{where}.retryPolicy")
        if kind == "initializevariable":
            variables = inputs.get("variables")
            if variables is not None and variables.kind == "arr":
                if len(variables.items) != 1:
                    self.fail(variables, f"{where}.variables", "one variable per InitializeVariable action")
                for i, var in enumerate(variables.items):
                    if var.kind != "obj":
                        continue
                    self.keys_within(var, {"name", "type", "value"}, f"{where}.variables[{i}]", "a variable")
                    for key in ("name", "type"):
                        if var.get(key) is None:
                            self.fail(var, f"{where}.variables[{i}]", f"a variable needs '{key}'")
                    t = var.get("type")
                    if t is not None and t.literal() is not None and t.literal().lower() not in VARIABLE_TYPES:
                        self.fail(t, f"{where}.variables[{i}].type", f"'{t.literal()}' is no variable type ({', '.join(sorted(VARIABLE_TYPES))})")
        if kind == "terminate":
            status = inputs.get("runStatus")
            if status is not None and status.literal() is not None and status.literal() not in ("Failed", "Cancelled", "Succeeded"):
                self.fail(status, f"{where}.runStatus", f"'{status.literal()}' is none of Failed, Cancelled, Succeeded")
            error = inputs.get("runError")
            if error is not None and error.kind == "obj":
                self.keys_within(error, {"code", "message"}, f"{where}.runError", "a run error")
                if status is not None and status.literal() not in (None, "Failed"):
                    self.fail(error, f"{where}.runError", "runError only with runStatus Failed")
        if kind in ("http", "apiconnection"):
            method = inputs.get("method")
            if method is not None and method.literal() is not None and method.literal().upper() not in ("GET", "PUT", "POST", "PATCH", "DELETE", "HEAD", "OPTIONS"):
                self.fail(method, f"{where}.method", f"'{method.literal()}' is no HTTP method")
        if kind == "apiconnection":
            host = inputs.get("host")
            if host is not None and host.kind == "obj":
                connection = host.get("connection")
                if connection is None or (connection.kind == "obj" and connection.get("name") is None):
                    self.fail(host, f"{where}.host", "host.connection.name names the connection")

    def retry_policy(self, policy, path):
        if policy.kind != "obj":
            return
        ty = policy.get("type")
        kinds = {"default", "none", "fixed", "exponential"}
        self.keys_within(policy, {"type", "count", "interval", "minimumInterval", "maximumInterval"}, path, "a retry policy")
        if ty is None:
            self.fail(policy, path, "a retry policy needs a type (default, none, fixed, exponential)")
            return
        kind = ty.literal().lower() if ty.literal() else None
        if kind is None:
            return
        if kind not in kinds:
            self.fail(ty, f"{path}.type", f"'{ty.literal()}' is none of {', '.join(sorted(kinds))}")
            return
        allowed = {
            "default": {"type"},
            "none": {"type"},
            "fixed": {"type", "count", "interval"},
            "exponential": {"type", "count", "interval", "minimumInterval", "maximumInterval"},
        }[kind]
        for key, item in policy.items:
            if key not in allowed:
                self.fail(item, f"{path}.{key}", f"not part of a {kind} retry policy")
        if kind in ("fixed", "exponential"):
            for key in ("count", "interval"):
                if policy.get(key) is None:
                    self.fail(policy, path, f"a {kind} retry policy needs '{key}'")
        count = policy.get("count")
        if count is not None and count.kind == "num" and not 1 <= count.text <= 90:
            self.fail(count, f"{path}.count", "count must be 1-90")
        for key in ("interval", "minimumInterval", "maximumInterval"):
            item = policy.get(key)
            if item is None or item.literal() is None:
                continue
            secs = duration_secs(item.literal())
            if secs is None:
                self.fail(item, f"{path}.{key}", f"'{item.literal()}' is no ISO 8601 duration")
            elif not 5 <= secs <= 86400:
                self.fail(item, f"{path}.{key}", "intervals must be between PT5S and P1D")

    def limit(self, limit, path, until):
        if limit is None or limit.kind != "obj":
            return
        self.keys_within(limit, {"count", "timeout"} if until else {"timeout"}, path, "a limit")
        timeout = limit.get("timeout")
        if timeout is not None and timeout.literal() is not None and duration_secs(timeout.literal()) is None:
            self.fail(timeout, f"{path}.timeout", f"'{timeout.literal()}' is no ISO 8601 duration")

    def runtime(self, node, path, role, kind):
        config = node.get("runtimeConfiguration")
        if config is None or config.kind != "obj":
            return
        where = f"{path}.runtimeConfiguration"
        self.keys_within(config, RUNTIME_KEYS, where, "runtimeConfiguration")
        concurrency = config.get("concurrency")
        if concurrency is not None and concurrency.kind == "obj":
            if role == "trigger":
                allowed = {"runs": (1, 100), "maximumWaitingRuns": (1, 100)}
            elif kind == "foreach":
                allowed = {"repetitions": (1, 50)}
            else:
                allowed = None
                self.fail(concurrency, f"{where}.concurrency", "concurrency applies to triggers and Foreach actions")
            if allowed is None:
                allowed = {}
            else:
                self.keys_within(concurrency, set(allowed), f"{where}.concurrency", f"the concurrency of a {role}")
            for key, (lo, hi) in allowed.items():
                v = concurrency.get(key)
                if v is not None and v.kind == "num" and not lo <= v.text <= hi:
                    self.fail(v, f"{where}.concurrency.{key}", f"must be {lo}-{hi}")
        pagination = config.get("paginationPolicy")
        if pagination is not None and pagination.kind == "obj":
            self.keys_within(pagination, {"minimumItemCount"}, f"{where}.paginationPolicy", "a pagination policy")
            if role != "action" or kind not in ("http", "apiconnection"):
                self.fail(pagination, f"{where}.paginationPolicy", "pagination applies to Http and ApiConnection actions")
        secure = config.get("secureData")
        if secure is not None and secure.kind == "obj":
            self.keys_within(secure, {"properties"}, f"{where}.secureData", "secureData")
            props = secure.get("properties")
            if props is not None and props.kind == "arr":
                for item in props.items:
                    if item.literal() is not None and item.literal() not in ("inputs", "outputs"):
                        self.fail(item, f"{where}.secureData.properties", f"'{item.literal()}' is neither inputs nor outputs")

    def operation_options(self, node, path, role, kind):
        options = node.get("operationOptions")
        if options is None or options.literal() is None:
            return
        for option in [o.strip() for o in options.literal().split(",") if o.strip()]:
            spec = OPERATION_OPTIONS.get(option)
            if spec is None:
                self.fail(options, f"{path}.operationOptions", f"'{option}' is no documented operation option ({', '.join(sorted(OPERATION_OPTIONS))})")
                continue
            want_role, kinds = spec
            if want_role != role or (kinds is not None and kind not in kinds):
                self.fail(options, f"{path}.operationOptions", f"{option} does not apply to this {role}")
            config = node.get("runtimeConfiguration")
            concurrency = config.get("concurrency") if config is not None else None
            if option == "SingleInstance" and concurrency is not None and concurrency.get("runs") is not None:
                self.fail(options, f"{path}.operationOptions", "SingleInstance and concurrency.runs: set one, not both")
            if option == "Sequential" and concurrency is not None and concurrency.get("repetitions") is not None:
                self.fail(options, f"{path}.operationOptions", "Sequential and concurrency.repetitions: set one, not both")

    def expression(self, expr, path):
        if expr is None or expr.kind != "obj":
            return
        for key, item in expr.items:
            if key.lower() not in PREDICATES:
                self.fail(item, f"{path}.{key}", f"'{key}' is no condition ({', '.join(sorted(PREDICATES))})")
            if key.lower() in ("and", "or") and item.kind == "arr":
                for i, sub in enumerate(item.items):
                    self.expression(sub, f"{path}.{key}[{i}]")
            elif key.lower() == "not":
                self.expression(item, f"{path}.{key}")

    def references(self, v, path):
        strings = []

        def walk(node):
            if node.kind == "str":
                strings.append(node)
            for item in node.items:
                walk(item[1] if isinstance(item, tuple) else item)

        walk(v)
        foreach = {n for n, t in self.names.items() if t in ("foreach", "until")}
        for s in strings:
            if "(" not in s.text:
                continue
            for fn, arg in REFERENCE.findall(s.text):
                name = arg.replace("''", "'")
                if fn in ("body", "outputs", "actions", "result"):
                    ok = name in self.names
                elif fn in ("items", "iterationIndexes"):
                    ok = name in foreach
                elif fn == "variables":
                    ok = name in self.variables
                else:
                    ok = name in self.parameters
                if not ok:
                    self.fail(s, path, f"{fn}('{name}') names nothing in this workflow")


# ---------------------------------------------------------------------------


def check_files(files):
    checker = Checker()
    resources = 0
    for name in files:
        bf = BicepFile(name)
        for symbol, rtype, existing, body, line in bf.resources:
            if existing:
                continue
            resources += 1
            checker.check_resource(bf, symbol, rtype, bf.value(body), line)
    return checker, resources


def check(files):
    checker, resources = check_files(files)
    for finding in checker.findings:
        print(finding)
    used = sorted({rtype for name in files for _, rtype, existing, _, _ in BicepFile(name).resources if not existing})
    for rtype in used:
        if rtype in MODELS and MODELS[rtype][2]:
            print(f"note: {rtype} checked against {MODELS[rtype][0]}.{MODELS[rtype][1]}: {MODELS[rtype][2]}")
        if rtype in UNMODELLED:
            print(f"note: {rtype} not checked: {UNMODELLED[rtype]}")
    print(f"api models: {len(files)} files, {resources} resources, {len(checker.findings)} findings")
    return 1 if checker.findings else 0


def self_test(directory):
    status = 0
    fixtures = sorted(Path(directory).glob("*.bicep"))
    if not fixtures:
        print(f"api models self-test: no fixtures in {directory}")
        return 1
    for fixture in fixtures:
        expected = re.findall(r"^// expect: (.+)$", fixture.read_text(), flags=re.M)
        checker, _ = check_files([str(fixture)])
        if not expected:
            print(f"{fixture}: no `// expect:` lines")
            status = 1
        for text in expected:
            if not any(text in f for f in checker.findings):
                print(f"{fixture}: expected a finding with {text!r}; got:")
                for f in checker.findings:
                    print(f"    {f}")
                status = 1
        if len(checker.findings) < len(expected):
            status = 1
    print(f"api models self-test: {len(fixtures)} fixtures, {'all failed as expected' if status == 0 else 'NOT all failed as expected'}")
    return status


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    if argv[1] == "check":
        return check(argv[2:])
    if argv[1] == "self-test":
        return self_test(argv[2])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
