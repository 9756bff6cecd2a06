"""What a deploy leaves for people and tools: report.json, report.md, the plot and manifest.json."""
