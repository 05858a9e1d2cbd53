"""Hourly prices of Azure VMs from Azure's public Retail Prices API, for ``raybatch cost``
(``raybatch cluster prices --region R`` writes them as ``prices.yaml``).

The API (no login): ``GET https://prices.azure.com/api/retail/prices`` with an OData
``$filter`` and ``currencyCode``; each answer has ``Items`` and a ``NextPageLink`` to the next
page (null on the last). What is kept of the Virtual Machines items of one region:

- Linux only: an item whose ``productName`` names Windows is skipped;
- ``skuName`` ending in "Spot" is the Spot price of ``armSkuName``, any other the dedicated
  (pay-as-you-go) price; one ending in "Low Priority" is the retired low-priority offer:
  skipped;
- hourly prices only (``unitOfMeasure`` "1 Hour"), ``type`` Consumption;
- one price per (``armSkuName``, spot): the newest ``effectiveStartDate`` (the region's
  primary meter first when two start the same day).

The format of the file is ``raybatch.scheduler.cost.Prices``."""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx

from raybatch.scheduler.cost import RETAIL_PRICES_URL, Prices, VmPrice

TIMEOUT = httpx.Timeout(60.0, connect=15.0)
MAX_PAGES = 5000        # a region's VM items are a few thousand, 100 (or 1000) per page
_REGION = re.compile(r"^[a-z][a-z0-9]*$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
REGION_HINT = "an Azure region name such as westeurope or eastus (`az account list-locations -o table`)"


class PricesFetchError(RuntimeError):
    """The prices could not be read (the message says what failed, and where)."""


def vm_filter(region: str) -> str:
    """The OData ``$filter`` of one region's pay-as-you-go VM prices."""
    return (f"serviceName eq 'Virtual Machines' and armRegionName eq '{region}' "
            "and priceType eq 'Consumption'")


def new_client() -> httpx.Client:
    """The HTTP client the API is read with (tests replace it with an httpx.MockTransport one)."""
    return httpx.Client(timeout=TIMEOUT, follow_redirects=True,
                        headers={"User-Agent": "raybatch (cluster prices)"})


def check_region(region: str) -> str:
    if not _REGION.match(region or ""):
        raise PricesFetchError(f"--region '{region}': not {REGION_HINT}")
    return region


def check_currency(currency: str) -> str:
    code = (currency or "").upper()
    if not _CURRENCY.match(code):
        raise PricesFetchError(f"--currency '{currency}': a currency is a 3-letter code such as USD or EUR")
    return code


def pages(region: str, currency: str, client: httpx.Client,
          on_page: Optional[Callable[[int, int], None]] = None) -> Iterator[list[dict[str, Any]]]:
    """The ``Items`` of each page of the answer, following ``NextPageLink`` to the end;
    ``on_page(pages read, items read)`` after each."""
    url: Optional[str] = RETAIL_PRICES_URL
    params: Optional[dict[str, str]] = {"$filter": vm_filter(region), "currencyCode": f"'{currency}'"}
    seen: set[str] = set()
    n = items = 0
    while url:
        if n >= MAX_PAGES:
            raise PricesFetchError(f"{RETAIL_PRICES_URL}: more than {MAX_PAGES} pages; stopped")
        try:
            r = client.get(url, params=params)
        except httpx.HTTPError as e:
            raise PricesFetchError(f"cannot read {RETAIL_PRICES_URL} (page {n + 1}): "
                                   f"{type(e).__name__}: {e}") from None
        if r.status_code >= 400:
            raise PricesFetchError(f"{RETAIL_PRICES_URL} answered {r.status_code} on page {n + 1}: {_message(r)}")
        try:
            body = r.json()
        except ValueError:
            raise PricesFetchError(f"{RETAIL_PRICES_URL}: page {n + 1} is not JSON: {r.text[:200]!r}") from None
        if not isinstance(body, dict) or not isinstance(body.get("Items"), list):
            raise PricesFetchError(f"{RETAIL_PRICES_URL}: page {n + 1} has no Items list: "
                                   "not an answer of the Retail Prices API")
        n += 1
        items += len(body["Items"])
        yield body["Items"]
        if on_page:
            on_page(n, items)
        nxt = body.get("NextPageLink")
        if nxt is not None and not isinstance(nxt, str):
            raise PricesFetchError(f"{RETAIL_PRICES_URL}: page {n}: NextPageLink {nxt!r} is not a link")
        if nxt and nxt in seen:
            raise PricesFetchError(f"{RETAIL_PRICES_URL}: page {n}: NextPageLink repeats an earlier page ({nxt})")
        if nxt:
            seen.add(nxt)
        url, params = nxt or None, None  # the link carries the filter and currency


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("Error") or body.get("error") or {}
        if isinstance(err, dict) and err.get("Message"):
            return str(err["Message"])
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (ValueError, AttributeError):
        pass
    return r.text[:300] or r.reason_phrase


class Selection:
    """The kept prices, as items arrive: (armSkuName, spot) -> the newest item's price."""

    def __init__(self, region: str, currency: str):
        self.region, self.currency = region, currency
        self.best: dict[tuple[str, bool], tuple[str, bool, float]] = {}  # -> (start, primary, price)
        self.seen = 0
        self.skipped: dict[str, int] = {"windows": 0, "low priority": 0, "not hourly": 0, "other": 0}

    def add(self, item: Any, where: str) -> None:
        self.seen += 1
        if not isinstance(item, dict):
            raise PricesFetchError(f"{where}: an item is not an object: {item!r:.100}")
        sku = item.get("armSkuName")
        if not sku:  # meters of no VM size (the API has a few)
            self.skipped["other"] += 1
            return
        for name in ("skuName", "productName", "unitOfMeasure", "effectiveStartDate"):
            if not isinstance(item.get(name), str):
                raise PricesFetchError(f"{where} ({sku}): {name} is missing or not a string: {item.get(name)!r}")
        if item.get("armRegionName") not in (None, self.region) or item.get("type") not in (None, "Consumption"):
            self.skipped["other"] += 1
            return
        if item.get("currencyCode") not in (None, self.currency):
            raise PricesFetchError(f"{where} ({sku}): currencyCode {item['currencyCode']!r}, "
                                   f"asked for {self.currency}")
        sku_name = item["skuName"].strip()
        if "windows" in item["productName"].lower():
            self.skipped["windows"] += 1
            return
        if sku_name.endswith("Low Priority"):
            self.skipped["low priority"] += 1
            return
        if item["unitOfMeasure"].strip() != "1 Hour":
            self.skipped["not hourly"] += 1
            return
        price = item.get("unitPrice")
        if isinstance(price, bool) or not isinstance(price, (int, float)) or price < 0:
            raise PricesFetchError(f"{where} ({sku}): unitPrice {price!r} is not a price")
        key = (sku, sku_name.endswith("Spot"))
        rank = (item["effectiveStartDate"], bool(item.get("isPrimaryMeterRegion", True)), float(price))
        if key not in self.best or rank[:2] > self.best[key][:2]:
            self.best[key] = rank

    def prices(self, fetched_at: str) -> Prices:
        out: dict[str, VmPrice] = {}
        for (sku, spot), (_start, _primary, price) in sorted(self.best.items()):
            entry = out.setdefault(sku, VmPrice())
            if spot:
                entry.spot = price
            else:
                entry.dedicated = price
        return Prices(region=self.region, currency=self.currency, fetched_at=fetched_at, prices=out)


def fetch_prices(region: str, currency: str = "USD", *, client: Optional[httpx.Client] = None,
                 on_page: Optional[Callable[[int, int], None]] = None) -> Prices:
    """One region's hourly Linux VM prices, dedicated and Spot, from the Retail Prices API."""
    region, currency = check_region(region), check_currency(currency)
    own = client is None
    client = client or new_client()
    sel = Selection(region, currency)
    try:
        for k, items in enumerate(pages(region, currency, client, on_page), start=1):
            for i, item in enumerate(items):
                sel.add(item, f"page {k}, item {i + 1}")
    finally:
        if own:
            client.close()
    if sel.seen == 0:
        raise PricesFetchError(f"no Virtual Machines prices for region '{region}': is it {REGION_HINT}?")
    if not sel.best:
        raise PricesFetchError(f"none of the {sel.seen} Virtual Machines prices of '{region}' is an hourly "
                               f"Linux price (skipped: {_skipped(sel.skipped)})")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return sel.prices(now)


def _skipped(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"


def write_prices(prices: Prices, path: str | Path) -> Path:
    """Write the prices file atomically (a reader never sees half of it)."""
    import yaml  # noqa: PLC0415

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = prices.model_dump(mode="json")
    data["prices"] = {k: {p: v for p, v in e.items() if v is not None} for k, e in data["prices"].items()}
    text = ("# Hourly prices of Linux VMs (dedicated = pay-as-you-go, spot), written by "
            "`raybatch cluster prices`;\n# `raybatch cost` reads them. Retail list prices: "
            "your agreement's may differ.\n") + yaml.safe_dump(data, sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=".prices.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
