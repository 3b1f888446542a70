# Parses OpenMetrics text from stdin with the Prometheus project's own Python parser
# (prometheus_client, from PyPI) and prints the samples as JSON:
# [{"family", "type", "help", "name", "labels", "value"}]. Exits non-zero if it does not parse.
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        out.append({"family": family.name, "type": family.type, "help": family.documentation,
                    "name": sample.name, "labels": sample.labels, "value": sample.value})
print(json.dumps(out))
