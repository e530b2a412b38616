"""The one-command pipeline: resumable stages from one YAML."""
