"""docs/reading-order.md names real functions at their real lines: it must equal what
scripts/reading_order.py writes from the current source."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reading_order_page_matches_the_code():
    fresh = subprocess.run([sys.executable, "scripts/reading_order.py"], cwd=ROOT,
                           capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    page = (ROOT / "docs" / "reading-order.md").read_text(encoding="utf-8")
    assert page == fresh.stdout, ("docs/reading-order.md is stale: run "
                                  "python scripts/reading_order.py > docs/reading-order.md")


def test_every_named_function_exists_where_the_page_says():
    sys.path.insert(0, str(ROOT / "scripts"))
    import reading_order
    for path in reading_order.PATHS.values():
        for file, name, _ in path:
            first, last = reading_order.definitions(ROOT / file)[name]
            text = (ROOT / file).read_text(encoding="utf-8").splitlines()[first - 1:last]
            assert any(line.lstrip().startswith((f"def {name}(", f"class {name}"))
                       for line in text), (file, name)
