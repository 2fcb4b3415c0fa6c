"""Static checks of the deployment files: hadolint on every Dockerfile, checkov on the
Dockerfiles and on the rendered Kubernetes manifests (offline, no download of its checks).

Nothing may be found: what a check flags on purpose is suppressed inline, next to the line it
is about, with the reason (a `# checkov:skip=` or `# hadolint ignore=` comment, or a
`checkov.io/skip` annotation), so a new finding fails here and an old one is explained where
it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from orchestrate.stack import IMAGES
from tests.support import REPO, require, run

LINTERS = REPO / "build" / "linters" / "bin"  # made by scripts/install-linters.sh
DOCKERFILES = sorted(
    str(path.relative_to(REPO)) for path in REPO.glob("**/Dockerfile")
    if path.relative_to(REPO).parts[0] not in ("build", ".git")
)


def linter(name: str) -> str:
    installed = LINTERS / name
    path = str(installed) if installed.exists() else shutil.which(name)
    require(path is not None, f"{name} (bash scripts/install-linters.sh)")
    assert path is not None
    return path


NO_REASON = "No comment provided"  # what checkov reports for a suppression without a reason


def reason(check: dict[str, Any]) -> str:
    return (check["check_result"].get("suppress_comment") or "").strip()


def checkov(*args: str) -> list[dict[str, Any]]:
    """checkov's reports (one per framework) for `args`."""
    result = run(linter("checkov"), "--skip-download", "--output", "json", *args,
                 check=False, timeout=600)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def assert_clean(reports: list[dict[str, Any]]) -> None:
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
              for report in reports for c in report["results"].get("failed_checks", [])]
    assert not failed, "\n".join(failed)
    unexplained = [f"{c['check_id']} {c['resource']}"
                   for report in reports for c in report["results"].get("skipped_checks", [])
                   if reason(c) in ("", NO_REASON)]
    assert not unexplained, f"suppressed without a reason: {unexplained}"


def test_the_dockerfiles_are_found() -> None:
    """Every recipe of the stack's images is linted (and no other Dockerfile hides here)."""
    recipes = {str(Path(spec.context) / spec.dockerfile) for spec in IMAGES.values()}
    recipes |= {f"{spec.offline_base}/Dockerfile" for spec in IMAGES.values() if spec.offline_base}
    assert set(DOCKERFILES) == {str(Path(r)) for r in recipes}, DOCKERFILES


def test_hadolint_finds_nothing() -> None:
    result = run(linter("hadolint"), *DOCKERFILES, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_finds_nothing_in_the_dockerfiles() -> None:
    assert_clean(checkov("--framework", "dockerfile", *(f"--file={f}" for f in DOCKERFILES)))


def test_checkov_finds_nothing_in_the_kubernetes_manifests(k8s_rendered: Path,
                                                            k8s_ha_rendered: Path) -> None:
    for rendered in (k8s_rendered, k8s_ha_rendered):
        assert_clean(checkov("--framework", "kubernetes", f"--file={rendered}"))
