"""Helpers the tests share: synthetic clips and projects (`video`), event rows and
thumbnails (`events`), whole temp stores, child processes and row snapshots
(`reliability`), and faults injected into store writes (`write_faults`). Two of them also
run as child-process scripts (`reliability`, `backfill_worker`)."""
