"""Checks for .ci/lint-infra that no off-the-shelf linter does.

    bicep-syntax FILE...          fail on any ERROR or MISSING node (tree-sitter-bicep)
    checkov-report JSON           fail on failed checks or Bicep parsing errors
    checkov-must-fail JSON ID...  fail unless every listed check failed (policy self-test)
    run-blocks OUTDIR WORKFLOW... write each `run:` block as a bash script for shellcheck

Runs inside the lint venv (PyYAML comes with checkov).
"""

import json
import re
import sys
from pathlib import Path


def bicep_syntax(files):
    import tree_sitter
    import tree_sitter_bicep

    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))
    problems = 0
    for name in files:
        tree = parser.parse(Path(name).read_bytes())
        stack = [tree.root_node]
        while stack:
            node = stack.pop()
            if node.type == "ERROR" or node.is_missing:
                row, col = node.start_point
                kind = "missing " + node.type if node.is_missing else "syntax error"
                print(f"{name}:{row + 1}:{col + 1}: {kind} near {node.text[:60]!r}")
                problems += 1
            stack.extend(node.children)
    print(f"bicep syntax: {len(files)} files, {problems} problems")
    return 1 if problems else 0


def _reports(path):
    data = json.loads(Path(path).read_text())
    return data if isinstance(data, list) else [data]


def checkov_report(path):
    status = 0
    for report in _reports(path):
        kind = report.get("check_type", "?")
        results = report.get("results", {})
        summary = report.get("summary", {})
        for check in results.get("failed_checks", []):
            print(
                f"{kind}: FAILED {check['check_id']} {check['check_name']} "
                f"({check.get('resource')}, {check.get('file_path')}:{check.get('file_line_range')})"
            )
            status = 1
        # checkov exits 0 when a file does not parse: that must not pass.
        for failed_file in results.get("parsing_errors", []) or []:
            print(f"{kind}: PARSING ERROR {failed_file}")
            status = 1
        if summary.get("parsing_errors"):
            status = 1
        print(
            f"checkov {kind}: passed {summary.get('passed')}, failed {summary.get('failed')}, "
            f"skipped {summary.get('skipped')}, parsing errors {summary.get('parsing_errors')}"
        )
    return status


def checkov_must_fail(path, ids):
    failed = set()
    for report in _reports(path):
        for check in report.get("results", {}).get("failed_checks", []):
            failed.add(check["check_id"])
    missing = [i for i in ids if i not in failed]
    for check_id in missing:
        print(f"policy self-test: {check_id} did not fire on tests/fixtures/policy-violations")
    print(f"policy self-test: {len(ids) - len(missing)}/{len(ids)} custom policies fired")
    return 1 if missing else 0


def run_blocks(outdir, workflows):
    import yaml

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for workflow in workflows:
        doc = yaml.safe_load(Path(workflow).read_text())
        for job_id, job in (doc.get("jobs") or {}).items():
            for index, step in enumerate(job.get("steps") or []):
                script = step.get("run")
                if script is None:
                    continue
                # GitHub expressions are not shell; stand in a plain word.
                script = re.sub(r"\$\{\{.*?\}\}", "GITHUB_EXPRESSION", script)
                name = f"{Path(workflow).stem}.{job_id}.{index}.sh"
                header = f"#!/usr/bin/env bash\n# {workflow}: job {job_id}, step {index}\nset -eo pipefail\n"
                (out / name).write_text(header + script)
                count += 1
    print(f"run blocks: {count} extracted from {len(workflows)} workflows")
    return 0 if count else 1


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    command, args = argv[1], argv[2:]
    if command == "bicep-syntax":
        return bicep_syntax(args)
    if command == "checkov-report":
        return checkov_report(args[0])
    if command == "checkov-must-fail":
        return checkov_must_fail(args[0], args[1:])
    if command == "run-blocks":
        return run_blocks(args[0], args[1:])
    print(f"unknown command {command}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
