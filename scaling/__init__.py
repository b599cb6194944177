"""The scaling-study orchestrator: study spec -> Ray -> MLflow -> Parquet -> report."""

__all__ = ["load_results"]


def __getattr__(name):
    # Imported on first use: `import scaling.study` should not pay for pandas and pyarrow.
    if name == "load_results":
        from scaling.results import load_results

        return load_results
    raise AttributeError(f"module 'scaling' has no attribute {name!r}")
