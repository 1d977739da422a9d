"""The local deployment's own asset: the built-in sample crawl, written as a local Common Crawl mirror at the crawl
source's base. Only the local definitions carry it (`laion_assets/definitions.py`); production never does."""

import dagster as dg

from laion_assets.config import config_class
from laion_assets.core.settings import SampleSettings, build
from laion_assets.offline import sample
from laion_assets.resources import CrawlSourceResource

CODE_VERSION = "2"
SampleCrawlConfig = config_class("SampleCrawlConfig", SampleSettings, doc="The built-in sample crawl's shape.")


@dg.asset(kinds={"python"}, group_name="crawl", code_version=CODE_VERSION)
def sample_crawl(config: SampleCrawlConfig, crawl_source: CrawlSourceResource):
    """The built-in sample crawl, written as a local Common Crawl mirror at the crawl source's base; the
    `new_crawls` sensor registers its crawl like any other."""
    if crawl_source.base.startswith(("s3://", "http://", "https://")):
        raise dg.Failure(f"the sample crawl is written to a local mirror; the crawl source is {crawl_source.base}")
    report = sample.build_sample_crawl(crawl_source.base, build(SampleSettings, config))
    return dg.MaterializeResult(value=report, metadata={
        "crawl": report.crawl, "mirror": dg.MetadataValue.path(report.mirror), "wat_files": len(report.wat_files),
        "pages": report.pages, "images": report.images, "image_links": report.image_links})


def local_assets() -> list[dg.AssetsDefinition]:
    """What the local definitions add to production's."""
    return [sample_crawl]
