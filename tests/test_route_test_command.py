"""`busway test`: route cases from TOML, run without a broker, with readable failures."""

from __future__ import annotations

from pathlib import Path

from tests.support import REPO, run_cli

CONFIG = """
[[streams]]
name = "IN"
subjects = ["in.>", "out.>", "lookups.>"]

[[routes]]
name = "lines"
from = "in.lines"
to = ["out.orders"]
stages = [
  { enrich = { request = "lookups.sku", body = "sku", into = "product" } },
  { aggregate = { by = "order", count = 2, timeout = "1m", into = "INTO" } },
]
""".replace("INTO", "{order: key, names: messages[].product.name}")


def write(tmp_path: Path, cases: str) -> Path:
    (tmp_path / "busway.toml").write_text(CONFIG)
    tests = tmp_path / "routes.test.toml"
    tests.write_text('config = "busway.toml"\n' + cases)
    return tests


def test_the_bundled_example_passes() -> None:
    result = run_cli("test", str(REPO / "deploy" / "busway.test.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed, 0 failed" in result.stdout


def test_a_wrong_expectation_fails_with_a_diff(tmp_path: Path) -> None:
    tests = write(
        tmp_path,
        """
[[cases]]
name = "pairs of lines make an order"
route = "lines"
replies = { "lookups.sku" = { name = "Widget" } }
inputs = [{ body = { order = "o1", sku = "w" } }, { body = { order = "o1", sku = "w" } }]
expect = [{ subject = "out.orders", body = { order = "o1", names = ["Widget", "Gadget"] } }]
""",
    )
    result = run_cli("test", str(tests))
    assert result.returncode == 1
    assert "FAIL  pairs of lines make an order" in result.stdout
    assert '-        "Gadget"' in result.stdout
    assert '+        "Widget"' in result.stdout
    assert "0 passed, 1 failed" in result.stdout


def test_aggregate_timeouts_flush_and_missing_replies_dead_letter(tmp_path: Path) -> None:
    tests = write(
        tmp_path,
        """
[[cases]]
name = "a lone line is published when its group times out"
route = "lines"
replies = { "lookups.sku" = { name = "Widget" } }
body = { order = "o2", sku = "w" }
expect = [{ subject = "out.orders", body = { order = "o2", names = ["Widget"] } }]

[[cases]]
name = "no answer to the lookup is an enrich failure"
route = "lines"
body = { order = "o3", sku = "w" }
dead_letter = "enrich"
""",
    )
    result = run_cli("test", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed, 0 failed" in result.stdout


def test_a_case_needs_an_expectation(tmp_path: Path) -> None:
    tests = write(tmp_path, '[[cases]]\nname = "x"\nroute = "lines"\nbody = {}\n')
    result = run_cli("test", str(tests))
    assert result.returncode == 2
    assert "needs exactly one of `expect` or `dead_letter`" in result.stderr


def test_an_unknown_route_fails_the_case(tmp_path: Path) -> None:
    tests = write(tmp_path, '[[cases]]\nname = "x"\nroute = "nope"\nbody = {}\nexpect = []\n')
    result = run_cli("test", str(tests))
    assert result.returncode == 1
    assert "no route 'nope' (routes: lines)" in result.stdout
