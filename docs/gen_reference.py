"""Write docs/reference/operators.md from the operator registry:
python docs/gen_reference.py"""

from pathlib import Path

from difforge.platform.opdoc import reference_markdown

if __name__ == "__main__":
    path = Path(__file__).parent / "reference" / "operators.md"
    path.write_text(reference_markdown())
    print(f"wrote {path}")
