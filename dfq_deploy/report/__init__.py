"""What a build says about itself: report.md, the report.json schema, quality gates and MLflow tracking."""
