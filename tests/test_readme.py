"""CI runs exactly the README's two set-up commands."""
import re

from conftest import REPO_ROOT


def test_ci_runs_the_readme_commands():
    readme_commands = re.findall(r"^```bash\n(.*?)\n```$", (REPO_ROOT / "README.md").read_text(), re.M | re.S)
    ci_commands = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
                   if line.startswith("pip install")]
    assert len(readme_commands) == 2
    assert ci_commands == readme_commands
