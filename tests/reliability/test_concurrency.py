"""Two jobs on one directory: the second is refused (local) or the older fenced off (S3) (concurrency.py)."""
from reliability import concurrency


def test_two_managers_on_one_directory(s3):
    concurrency.run_concurrency(s3_url=s3).assert_all_ok()
