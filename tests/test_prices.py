"""``raybatch cluster prices`` and its parser (raybatch.cluster.prices) against recorded pages
of Azure's Retail Prices API, served by an httpx.MockTransport: prices.azure.com cannot be
reached from here. The pages are written in the documented shape (Items, NextPageLink,
BillingCurrency; items with armSkuName, skuName, productName, unitPrice, unitOfMeasure,
effectiveStartDate, armRegionName, currencyCode, type), with made-up prices."""

from __future__ import annotations

import httpx
import pytest
from typer.testing import CliRunner

from raybatch.cluster import prices as fetcher
from raybatch.cluster.prices import PricesFetchError, fetch_prices, vm_filter, write_prices
from raybatch.scheduler.cost import PricesError, load_prices

API = "https://prices.azure.com/api/retail/prices"
FILTER = "serviceName eq 'Virtual Machines' and armRegionName eq 'westeurope' and priceType eq 'Consumption'"


def item(sku, sku_name, product, price, start="2024-01-01T00:00:00Z", unit="1 Hour", **kw):
    return {"currencyCode": "USD", "tierMinimumUnits": 0.0, "retailPrice": price, "unitPrice": price,
            "armRegionName": "westeurope", "location": "EU West", "effectiveStartDate": start,
            "meterId": "00000000-0000-0000-0000-000000000000", "meterName": sku_name, "productId": "DZH318Z0BQ4L",
            "skuId": "DZH318Z0BQ4L/00TG", "productName": product, "skuName": sku_name,
            "serviceName": "Virtual Machines", "serviceId": "DZH313Z7MMC8", "serviceFamily": "Compute",
            "unitOfMeasure": unit, "type": "Consumption", "isPrimaryMeterRegion": True, "armSkuName": sku, **kw}


DSV3, DSV3_WIN = "Virtual Machines DSv3 Series", "Virtual Machines DSv3 Series Windows"
NCT4 = "Virtual Machines NCasT4_v3 Series"
PAGES = {
    1: [item("Standard_D2s_v3", "D2s v3", DSV3, 0.12, start="2022-06-01T00:00:00Z"),   # superseded below
        item("Standard_D2s_v3", "D2s v3", DSV3_WIN, 0.20),                                # Windows: skipped
        item("Standard_D2s_v3", "D2s v3 Low Priority", DSV3, 0.03),                       # retired offer: skipped
        item("Standard_D2s_v3", "D2s v3 Spot", DSV3_WIN, 0.04)],                          # Windows Spot: skipped
    2: [item("Standard_D2s_v3", "D2s v3", DSV3, 0.096, start="2024-03-01T00:00:00Z"),
        item("Standard_D2s_v3", "D2s v3 Spot", DSV3, 0.0192),
        item("", "D2s v3", DSV3, 9.9),                                                    # no VM size: skipped
        item("Standard_NC4as_T4_v3", "NC4as T4 v3", NCT4, 0.526)],
    3: [item("Standard_NC4as_T4_v3", "NC4as T4 v3 Spot", NCT4, 0.1578),
        item("Standard_NC4as_T4_v3", "NC4as T4 v3", NCT4, 52.6, unit="100 Hours")],       # not hourly: skipped
}


def page_link(n: int) -> str:
    return f"{API}?currencyCode='USD'&$filter={FILTER}&$skip={100 * (n - 1)}"


def answer(n: int, items=None, last=3) -> dict:
    return {"BillingCurrency": "USD", "CustomerEntityId": "Default", "CustomerEntityType": "Retail",
            "Items": PAGES[n] if items is None else items, "NextPageLink": page_link(n + 1) if n < last else None,
            "Count": len(PAGES[n] if items is None else items)}


class Api:
    """The recorded pages; ``requests`` is what was asked."""

    def __init__(self, pages=None):
        self.pages = pages or {n: answer(n) for n in PAGES}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        skip = request.url.params.get("$skip")
        n = 1 + int(skip) // 100 if skip else 1
        got = self.pages[n]
        return got if isinstance(got, httpx.Response) else httpx.Response(200, json=got)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))


def test_pages_are_followed_and_one_price_kept_per_size_and_spot():
    api = Api()
    seen = []
    got = fetch_prices("westeurope", "usd", client=api.client(), on_page=lambda n, k: seen.append((n, k)))
    first = api.requests[0].url
    assert str(first).startswith(API) and first.params["$filter"] == FILTER == vm_filter("westeurope")
    assert first.params["currencyCode"] == "'USD'"
    assert [r.url.params.get("$skip") for r in api.requests] == [None, "100", "200"]
    assert seen == [(1, 4), (2, 8), (3, 10)]
    assert {k: v.model_dump() for k, v in got.prices.items()} == {
        "Standard_D2s_v3": {"dedicated": 0.096, "spot": 0.0192},   # the newest effectiveStartDate wins
        "Standard_NC4as_T4_v3": {"dedicated": 0.526, "spot": 0.1578},
    }
    assert got.region == "westeurope" and got.currency == "USD" and got.fetched_at.endswith("Z")


def test_written_file_reads_back_and_is_what_cost_uses(tmp_path):
    got = fetch_prices("westeurope", client=Api().client())
    path = write_prices(got, tmp_path / "sub" / "prices.yaml")
    again = load_prices(path)
    assert again == got and again.price("Standard_NC4as_T4_v3", spot=True) == 0.1578
    assert path.read_text().startswith("# Hourly prices of Linux VMs")
    assert [p.name for p in path.parent.iterdir()] == ["prices.yaml"]  # no temporary file left


@pytest.mark.parametrize("pages, message", [
    ({1: httpx.Response(500, json={"Error": {"Code": "InternalError", "Message": "try later"}})},
     "answered 500 on page 1: try later"),
    ({1: answer(1), 2: httpx.Response(429, text="Too Many Requests")}, "answered 429 on page 2: Too Many Requests"),
    ({1: answer(1, items=[], last=1)}, "no Virtual Machines prices for region 'westeurope': is it an Azure region"),
    ({1: answer(1, items=[PAGES[1][1], PAGES[1][2]], last=1)},
     "none of the 2 Virtual Machines prices of 'westeurope' is an hourly Linux price "
     r"\(skipped: 1 windows, 1 low priority\)"),
    ({1: answer(1, items=[item("Standard_D2s_v3", "D2s v3", DSV3, "0.1")], last=1)},
     r"page 1, item 1 \(Standard_D2s_v3\): unitPrice '0.1' is not a price"),
    ({1: answer(1, items=[{**PAGES[2][0], "skuName": None}], last=1)},
     r"page 1, item 1 \(Standard_D2s_v3\): skuName is missing"),
    ({1: httpx.Response(200, text="<html>maintenance</html>")}, "page 1 is not JSON"),
    ({1: httpx.Response(200, json={"value": []})}, "page 1 has no Items list"),
    ({1: answer(1), 2: {**answer(2), "NextPageLink": page_link(2)}}, "NextPageLink repeats an earlier page"),
])
def test_errors_say_what_failed(pages, message):
    with pytest.raises(PricesFetchError, match=message):
        fetch_prices("westeurope", client=Api(pages).client())


def test_unreachable_and_bad_arguments():
    def down(request):
        raise httpx.ConnectError("name resolution failed", request=request)

    with pytest.raises(PricesFetchError, match="cannot read https://prices.azure.com/api/retail/prices "
                                               r"\(page 1\): ConnectError: name resolution failed"):
        fetch_prices("westeurope", client=httpx.Client(transport=httpx.MockTransport(down)))
    api = Api()
    with pytest.raises(PricesFetchError, match="--region 'West Europe': not an Azure region name"):
        fetch_prices("West Europe", client=api.client())
    with pytest.raises(PricesFetchError, match="--currency 'dollars'"):
        fetch_prices("westeurope", "dollars", client=api.client())
    assert api.requests == []  # refused before asking


def test_prices_file_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("region: westeurope\ncurrency: USD\nfetched_at: x\nprices:\n  Standard_D2s_v3: {spot: -1, dedicated: 1}\n")
    with pytest.raises(PricesError, match=r"p.yaml: prices.Standard_D2s_v3.spot: Input should be greater"):
        load_prices(bad)
    bad.write_text("region: westeurope\nprices: {}\n")
    with pytest.raises(PricesError, match="currency: Field required"):
        load_prices(bad)
    with pytest.raises(PricesError, match="cannot read"):
        load_prices(tmp_path / "missing.yaml")


def test_cli_writes_the_default_file(tmp_path, monkeypatch):
    from raybatch.cli.main import app

    api = Api()
    monkeypatch.setattr(fetcher, "new_client", api.client)
    monkeypatch.setenv("RAYBATCH_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    out = runner.invoke(app, ["cluster", "prices", "--region", "westeurope"])
    assert out.exit_code == 0, out.output
    assert "2 VM sizes in westeurope (2 dedicated, 2 spot prices, USD per hour)" in out.output
    written = load_prices(tmp_path / "home" / "prices.yaml")
    assert written.prices["Standard_D2s_v3"].spot == 0.0192
    out = runner.invoke(app, ["cluster", "prices", "--region", "westeurope", "--currency", "EUR",
                              "--file", str(tmp_path / "eur.yaml")])
    assert out.exit_code == 1 and "currencyCode 'USD', asked for EUR" in out.output  # the recorded pages are USD
    assert api.requests[-1].url.params["currencyCode"] == "'EUR'" and not (tmp_path / "eur.yaml").exists()
    monkeypatch.setattr(fetcher, "new_client", Api({1: httpx.Response(503, text="unavailable")}).client)
    out = runner.invoke(app, ["cluster", "prices", "--region", "westeurope", "--file", str(tmp_path / "x.yaml")])
    assert out.exit_code == 1 and "answered 503 on page 1: unavailable" in out.output
