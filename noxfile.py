"""Developer sessions: `nox -s tests` (the CI suite), `nox -s lint`, `nox -s slow`,
`nox -s benchmarks`. Each session installs what it needs into its own virtualenv."""

import nox


nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

ENV = {"JAX_PLATFORMS": "cpu"}


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite minus checks marked slow (what CI runs)."""
    session.install("-e", ".[tests,anndata]")
    session.run(
        "pytest",
        "-m",
        "not slow",
        "-n",
        "2",
        "--dist",
        "loadfile",
        *session.posargs,
        env=ENV,
    )


@nox.session
def slow(session: nox.Session) -> None:
    """Only the slow checks (longer statistical tests), outside CI."""
    session.install("-e", ".[tests]")
    session.run("pytest", "-m", "slow", *session.posargs, env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (format and lint) and pyright."""
    session.install("-e", ".", "ruff==0.17.6", "pyright==1.1.414")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("pyright")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Training speed against the PyTorch reference (installs CPU-only torch)."""
    session.install("-e", ".[torch-reference]")
    session.run("python", "benchmarks/train_speed.py", *session.posargs, env=ENV)
