"""Video assets are partitioned by project; the project sensor adds the keys."""

from dagster import DynamicPartitionsDefinition

projects_partitions = DynamicPartitionsDefinition(name="projects")
