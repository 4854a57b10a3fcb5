"""The paper's analyses over a subject (2 vs 2, 1 vs 2 of attacks and mistakes, training dynamics), the
quickstart and reproduce studies, figures and reports."""
if __name__ != "semguard.analysis":  # this folder installs as semguard.analysis only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.analysis, not {__name__}: semguard installs one import name")
