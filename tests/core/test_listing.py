"""Merging the DCs' pages of a List, and ids' home DCs: pure, checked over many cases."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.core.home import home_dc, id_homed_in, ranked
from mesh.core.listing import Page, merge

DC_NAMES = ["east", "north", "west"]


def dc_page(keys: list[str], wanted: set[str], after: str, limit: int, budget: int) -> Page[str]:
    """A DC's page as the store makes one: it scans at most ``budget`` keys after
    ``after``, keeps the ``wanted`` ones up to ``limit``, and says how far it got."""
    rest = [k for k in keys if k > after]
    found: list[str] = []
    for scanned, key in enumerate(rest[:budget], start=1):
        if key in wanted:
            found.append(key)
            if len(found) == limit:
                return Page(found, key if scanned < len(rest) else "")
    if len(rest) <= budget:
        return Page(found, "")
    return Page(found, rest[budget - 1])


ids = st.text(alphabet="abcdef0123", min_size=1, max_size=4)


@given(
    placed=st.dictionaries(ids, st.integers(min_value=0, max_value=2), max_size=60),
    wanted_share=st.integers(min_value=1, max_value=3),
    limit=st.integers(min_value=1, max_value=7),
    budgets=st.lists(st.integers(min_value=1, max_value=9), min_size=3, max_size=3),
)
def test_paging_through_merged_pages_lists_every_task_once_in_order(
    placed: dict[str, int], wanted_share: int, limit: int, budgets: list[int]
) -> None:
    """Each task is recorded in one DC (``placed``); each DC stops its pages where its
    own scan budget runs out."""
    keys = [sorted(k for k, dc in placed.items() if dc == i) for i in range(3)]
    wanted = {k for i, k in enumerate(sorted(placed)) if i % wanted_share == 0}
    listed: list[str] = []
    after = ""
    for _ in range(1000):
        pages = [dc_page(dc, wanted, after, limit, budgets[i]) for i, dc in enumerate(keys)]
        page = merge(pages, limit, key=lambda k: k)
        assert len(page.items) <= limit
        listed += page.items
        if not page.last:
            break
        assert page.last > after, "a page must move the cursor on"
        after = page.last
    assert listed == sorted(wanted)


@given(task_id=ids, dcs=st.sets(st.sampled_from(DC_NAMES), min_size=1))
def test_every_agent_agrees_on_an_ids_home_and_only_its_ids_move_with_a_dc(
    task_id: str, dcs: set[str]
) -> None:
    home = home_dc(task_id, dcs)
    assert home == home_dc(task_id, sorted(dcs, reverse=True))  # order-free
    assert ranked(task_id, dcs)[0] == home
    if len(dcs) > 1:
        others = dcs - {home}
        gone = sorted(others)[0]
        assert home_dc(task_id, dcs - {gone}) == home  # another DC left: it stays


def test_ids_drawn_for_a_dc_are_homed_there() -> None:
    for dc in DC_NAMES:
        assert all(home_dc(id_homed_in(dc, DC_NAMES), DC_NAMES) == dc for _ in range(50))
