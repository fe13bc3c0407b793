"""A synthetic query-classification world with gold intent sets and Matthew-effect clicks
(spec §1.2; docs/query.md, "Synthetic world").

Pure and seeded, like :mod:`core.world`. A category tree (top categories -> leaves) where each
leaf has a canonical name, colloquial synonyms and product words; mid-level groups of related
leaves; brands selling in a few leaves. Queries of five kinds, each with its gold intent set T(q):

* ``leaf``: [brand] [attribute] surface(leaf) (canonical name or a synonym) -> {leaf}
* ``product``: [attribute] product-word -> {leaf}
* ``group``: [attribute] surface(group), e.g. "athletic shoes" -> the group's leaves
* ``top``: surface(top), e.g. "footwear" -> every leaf of the top category
* ``brand``: brand [attribute] -> the leaves the brand sells in

Clicks follow a Matthew effect: result pages show products of the gold leaves ranked by leaf
popularity (Zipf), plus noise; P(click) = CTR(position) x relevance x popularity boost. The
observed click labels of a query (leaves with a click share >= ``label_share``) therefore
under-cover T(q) for tail leaves, which is what SMGCN/SSUF address. Posterior knowledge per query
(the most clicked categories, brands and titles) comes from the same clicks.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# top -> (surfaces of the top, {group surface: [leaf names]}, {leaf: (synonyms, product words)})
TAXONOMY: dict[str, tuple[list[str], dict[str, list[str]], dict[str, tuple[list[str], list[str]]]]] = {
    "shoes": (["shoes", "footwear"], {"athletic shoes": ["running shoes", "sneakers"],
                                       "outdoor footwear": ["hiking boots", "sandals"]}, {
        "running shoes": (["trainers", "jogging shoes", "runners"], ["mesh", "cushioned sole", "marathon", "road running"]),
        "sneakers": (["kicks", "casual shoes", "plimsolls"], ["canvas", "low top", "skate", "lace up"]),
        "hiking boots": (["trekking boots", "walking boots"], ["ankle support", "vibram", "gore tex", "trail"]),
        "sandals": (["flip flops", "slides"], ["open toe", "strap", "beach", "cork footbed"]),
        "slippers": (["house shoes", "moccasins"], ["fleece lined", "indoor", "memory foam", "slip on"]),
        "high heels": (["stilettos", "pumps"], ["pointed toe", "platform", "evening", "heel height"]),
    }),
    "electronics": (["electronics", "gadgets"], {"audio": ["headphones", "speakers", "earbuds"],
                                                  "computing": ["laptops", "tablets"]}, {
        "headphones": (["headset", "cans"], ["over ear", "noise cancelling", "studio", "wired"]),
        "earbuds": (["in ear headphones", "earphones"], ["true wireless", "charging case", "bluetooth 5", "ear tips"]),
        "speakers": (["speaker system", "soundbar"], ["subwoofer", "portable", "waterproof speaker", "bass"]),
        "laptops": (["notebook computer", "ultrabook"], ["ssd", "16gb ram", "14 inch screen", "intel core"]),
        "tablets": (["ipad", "slate"], ["stylus", "10 inch display", "android", "retina"]),
        "smartwatches": (["fitness watch", "wearable"], ["heart rate", "gps", "step counter", "watch strap"]),
    }),
    "home": (["home", "furniture"], {"seating": ["sofas", "office chairs", "armchairs"],
                                      "bedroom": ["mattresses", "bed frames"]}, {
        "sofas": (["couch", "settee", "loveseat"], ["sectional", "three seater", "upholstered", "recliner"]),
        "office chairs": (["desk chair", "task chair"], ["lumbar support", "swivel", "mesh back", "ergonomic"]),
        "armchairs": (["accent chair", "reading chair"], ["wingback", "velvet", "tufted", "club chair"]),
        "mattresses": (["bed mattress", "sleeping pad"], ["memory foam mattress", "pocket spring", "queen size", "firm"]),
        "bed frames": (["bedstead", "platform bed"], ["headboard", "slats", "king size", "storage drawers"]),
        "rugs": (["carpet", "area rug", "runner rug"], ["shag", "jute", "persian", "non slip"]),
    }),
    "outdoor": (["outdoor gear", "camping gear"], {"shelter": ["tents", "sleeping bags"],
                                                    "hiking gear": ["backpacks", "trekking poles"]}, {
        "tents": (["shelter", "camping tent"], ["2 person", "dome", "rainfly", "pop up"]),
        "sleeping bags": (["sleeping sack", "bedroll"], ["mummy", "down fill", "zero degree", "compression sack"]),
        "backpacks": (["rucksack", "daypack", "knapsack"], ["hydration", "40 liter", "hip belt", "laptop sleeve"]),
        "trekking poles": (["hiking sticks", "walking poles"], ["carbon", "collapsible", "cork grip", "anti shock"]),
        "headlamps": (["head torch", "head light"], ["lumens", "rechargeable", "red light", "beam"]),
        "rain jackets": (["raincoat", "shell jacket"], ["hooded", "packable", "windproof", "seam sealed"]),
    }),
    "beauty": (["beauty", "cosmetics"], {"skin care": ["face cream", "sunscreen", "serums"],
                                          "makeup": ["lipstick", "mascara"]}, {
        "face cream": (["moisturizer", "face lotion"], ["hyaluronic", "spf", "night cream", "anti aging"]),
        "sunscreen": (["sunblock", "sun cream"], ["spf 50", "mineral", "reef safe", "broad spectrum"]),
        "serums": (["face serum", "essence"], ["vitamin c", "retinol", "niacinamide", "dropper"]),
        "lipstick": (["lip color", "lip stain"], ["matte", "nude", "long lasting", "gloss"]),
        "mascara": (["lash mascara", "lash tint"], ["volumizing", "lengthening", "waterproof mascara", "wand"]),
        "shampoo": (["hair wash", "cleanser for hair"], ["sulfate free", "dandruff", "volumizing shampoo", "keratin"]),
    }),
    "kitchen": (["kitchen", "cookware"], {"small appliances": ["coffee makers", "blenders", "toasters"],
                                           "pots and pans": ["frying pans", "saucepans"]}, {
        "coffee makers": (["coffee machine", "espresso maker"], ["drip", "espresso", "carafe", "pod"]),
        "blenders": (["smoothie maker", "food blender"], ["pitcher", "1000 watt", "pulse", "crushing ice"]),
        "toasters": (["toaster oven", "bread toaster"], ["4 slice", "bagel", "defrost", "crumb tray"]),
        "frying pans": (["skillet", "fry pan"], ["non stick", "cast iron", "12 inch", "ceramic"]),
        "saucepans": (["sauce pot", "stock pot"], ["lid", "stainless steel", "3 quart", "induction"]),
        "knife sets": (["kitchen knives", "cutlery set"], ["chef knife", "block", "forged", "santoku"]),
    }),
    "toys": (["toys", "kids games"], {"building toys": ["building blocks", "model kits"],
                                       "outdoor play": ["scooters", "water guns"]}, {
        "building blocks": (["bricks", "construction toys"], ["lego compatible", "1000 pieces", "stem", "baseplate"]),
        "model kits": (["scale models", "model airplanes"], ["1:72", "glue", "paint set", "assembly"]),
        "scooters": (["kick scooter", "push scooter"], ["foldable", "light up wheels", "3 wheel", "handlebar"]),
        "water guns": (["squirt guns", "water blasters"], ["super soaker", "pump action", "pool", "summer"]),
        "dolls": (["baby doll", "fashion doll"], ["dollhouse", "outfits", "hair styling", "plush body"]),
        "board games": (["tabletop games", "family games"], ["strategy", "dice", "card game", "2 to 4 players"]),
    }),
    "sports": (["sports", "fitness"], {"strength training": ["dumbbells", "kettlebells"],
                                        "ball sports": ["basketballs", "soccer balls"]}, {
        "dumbbells": (["hand weights", "free weights"], ["adjustable", "hex", "rubber coated", "pair"]),
        "kettlebells": (["kettle bell", "swing weight"], ["cast iron kettlebell", "16 kg", "competition", "handle"]),
        "basketballs": (["hoops ball", "b ball"], ["indoor outdoor", "size 7", "composite leather", "grip"]),
        "soccer balls": (["footballs", "futbol"], ["size 5", "match ball", "training ball", "stitched"]),
        "yoga mats": (["exercise mat", "pilates mat"], ["non slip mat", "6mm", "tpe", "alignment lines"]),
        "bicycles": (["bikes", "cycles"], ["mountain bike", "21 speed", "disc brakes", "road bike"]),
    }),
}
BRANDS = ["acme", "nordik", "zento", "kairo", "lumo", "vexa", "oakfield", "sora", "brisk", "halden",
          "mirra", "tovo", "quill", "rendo", "astra", "peli"]
ATTRIBUTES = ["red", "black", "white", "blue", "waterproof", "wireless", "leather", "kids", "womens",
              "mens", "large", "small", "premium", "lightweight", "organic", "cheap", "vintage", "grey"]


@dataclass(frozen=True)
class QueryWorldConfig:
    seed: int = 0
    n_queries: int = 2500
    kind_weights: tuple[tuple[str, float], ...] = (("leaf", 0.55), ("product", 0.12), ("group", 0.15),
                                                   ("top", 0.05), ("brand", 0.13))
    synonym_prob: float = 0.5  # a leaf/group surface is a colloquial synonym rather than the name
    attr_prob: float = 0.4
    brand_prob: float = 0.25
    typo_prob: float = 0.05
    leaf_zipf: float = 1.1  # leaf popularity ~ 1 / rank^s (Matthew effect)
    query_zipf: float = 1.0
    impressions: int = 60_000  # result pages over all queries (~ popularity)
    slots: int = 6
    noise_prob: float = 0.15  # a slot shows a random other leaf
    popularity_boost: float = 0.6  # click propensity ∝ (π / π_max)^boost
    label_share: float = 0.15  # a leaf is a click label when it has >= this share of the query's clicks
    brands_per_leaf: int = 4


@dataclass
class QueryRecord:
    text: str
    kind: str
    gold: list[str]
    popularity: float
    impressions: int = 0
    clicks: Counter = field(default_factory=Counter)  # leaf -> clicks
    brand_clicks: Counter = field(default_factory=Counter)
    title_clicks: Counter = field(default_factory=Counter)

    def click_labels(self, share: float) -> list[str]:
        n = sum(self.clicks.values())
        return sorted(k for k, v in self.clicks.items() if n and v / n >= share)


class QueryWorld:
    """Categories (ids ``top/leaf-name``), queries with gold sets, clicks and knowledge."""

    def __init__(self, config: QueryWorldConfig | None = None) -> None:
        self.config = cfg = config or QueryWorldConfig()
        rng = np.random.default_rng(cfg.seed)
        self.rng = rng
        self.leaves: list[str] = []
        self.leaf_name: dict[str, str] = {}
        self.synonyms: dict[str, list[str]] = {}
        self.product_words: dict[str, list[str]] = {}
        self.groups: dict[str, list[str]] = {}  # group surface -> leaf ids
        self.top_surfaces: dict[str, list[str]] = {}
        self.top_leaves: dict[str, list[str]] = defaultdict(list)
        for top, (tsurf, groups, leaves) in TAXONOMY.items():
            self.top_surfaces[top] = list(tsurf)
            for name, (syn, words) in leaves.items():
                lid = f"{top}/{name.replace(' ', '-')}"
                self.leaves.append(lid)
                self.leaf_name[lid] = name
                self.synonyms[lid] = list(syn)
                self.product_words[lid] = list(words)
                self.top_leaves[top].append(lid)
            for g, names in groups.items():
                self.groups[g] = [f"{top}/{n.replace(' ', '-')}" for n in names]
        # leaf popularity: Zipf over a random order (the Matthew effect's prior)
        order = rng.permutation(len(self.leaves))
        self.popularity = {self.leaves[i]: 1.0 / (r + 1) ** cfg.leaf_zipf for r, i in enumerate(order)}
        # brands: each sells in a few leaves of one or two tops
        self.brand_leaves: dict[str, list[str]] = {}
        tops = list(TAXONOMY)
        for b in BRANDS:
            ts = rng.choice(len(tops), size=2 if rng.random() < 0.3 else 1, replace=False)
            pool = [leaf for t in ts for leaf in self.top_leaves[tops[int(t)]]]
            k = int(rng.integers(2, 5))
            self.brand_leaves[b] = sorted(pool[int(i)] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False))
        self.leaf_brands: dict[str, list[str]] = defaultdict(list)
        for b, ls in self.brand_leaves.items():
            for leaf in ls:
                self.leaf_brands[leaf].append(b)
        self.queries: list[QueryRecord] = []
        self._build_queries(rng)
        self._simulate_clicks(rng)

    # ---- queries
    def _surface(self, rng, leaf: str) -> str:
        if rng.random() < self.config.synonym_prob:
            syn = self.synonyms[leaf]
            return syn[int(rng.integers(len(syn)))]
        return self.leaf_name[leaf]

    def _decorate(self, rng, core: str, brand: bool = True) -> str:
        cfg = self.config
        words = core.split()
        if rng.random() < cfg.attr_prob:
            words.insert(0, ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))])
        text = " ".join(words)
        if rng.random() < cfg.typo_prob and len(text) > 4:
            j = int(rng.integers(1, len(text) - 1))
            text = text[:j] + text[j + 1:]  # a dropped character
        return text

    def _one_query(self, rng) -> tuple[str, str, list[str]]:
        cfg = self.config
        kinds, w = zip(*cfg.kind_weights)
        kind = kinds[int(rng.choice(len(kinds), p=np.array(w) / sum(w)))]
        pop = np.array([self.popularity[leaf] for leaf in self.leaves])
        if kind in ("leaf", "product"):
            leaf = self.leaves[int(rng.choice(len(self.leaves), p=pop ** 0.5 / (pop ** 0.5).sum()))]
            if kind == "leaf":
                text = self._surface(rng, leaf)
                if rng.random() < cfg.brand_prob and self.leaf_brands.get(leaf):
                    bs = self.leaf_brands[leaf]
                    text = f"{bs[int(rng.integers(len(bs)))]} {text}"
            else:
                ws = self.product_words[leaf]
                text = ws[int(rng.integers(len(ws)))]
            return self._decorate(rng, text), kind, [leaf]
        if kind == "group":
            gs = list(self.groups)
            g = gs[int(rng.integers(len(gs)))]
            return self._decorate(rng, g), kind, list(self.groups[g])
        if kind == "top":
            tops = list(self.top_surfaces)
            t = tops[int(rng.integers(len(tops)))]
            s = self.top_surfaces[t]
            return s[int(rng.integers(len(s)))], kind, list(self.top_leaves[t])
        b = BRANDS[int(rng.integers(len(BRANDS)))]
        return self._decorate(rng, b), kind, list(self.brand_leaves[b])

    def _build_queries(self, rng) -> None:
        cfg = self.config
        by_text: dict[str, QueryRecord] = {}
        tries = 0
        while len(by_text) < cfg.n_queries and tries < cfg.n_queries * 20:
            tries += 1
            text, kind, gold = self._one_query(rng)
            rec = by_text.get(text)
            if rec is None:
                by_text[text] = QueryRecord(text, kind, sorted(set(gold)), 0.0)
            else:  # the same text from two concepts: both intents are gold
                rec.gold = sorted(set(rec.gold) | set(gold))
        recs = list(by_text.values())
        ranks = rng.permutation(len(recs))
        for r, rec in zip(ranks, recs):
            rec.popularity = 1.0 / (int(r) + 1) ** cfg.query_zipf
        self.queries = recs

    # ---- clicks
    def title(self, rng, leaf: str, brand: str | None = None) -> tuple[str, str]:
        """A product title of ``leaf`` (by ``brand`` when it sells there)."""
        bs = self.leaf_brands.get(leaf) or BRANDS[:1]
        b = brand if brand in bs else bs[int(rng.integers(len(bs)))]
        w = self.product_words[leaf]
        return b, f"{b} {w[int(rng.integers(len(w)))]} {self.leaf_name[leaf]}"

    def _simulate_clicks(self, rng) -> None:
        cfg = self.config
        pops = np.array([q.popularity for q in self.queries])
        n_imp = rng.multinomial(cfg.impressions, pops / pops.sum())
        pmax = max(self.popularity.values())
        for q, n in zip(self.queries, n_imp):
            q.impressions = int(n)
            gold = q.gold
            gp = np.array([self.popularity[g] for g in gold])
            brand = next((w for w in q.text.split() if w in self.brand_leaves), None)
            for _ in range(int(n)):
                # rank gold leaves by popularity-weighted draws (popular leaves fill the top slots)
                for pos in range(cfg.slots):
                    if rng.random() < cfg.noise_prob:
                        leaf = self.leaves[int(rng.integers(len(self.leaves)))]
                    else:
                        leaf = gold[int(rng.choice(len(gold), p=gp / gp.sum()))]
                    rel = 1.0 if leaf in gold else 0.08
                    ctr = 0.3 / math.log2(pos + 2)
                    p = ctr * rel * (self.popularity[leaf] / pmax) ** cfg.popularity_boost
                    if rng.random() < p:
                        b, t = self.title(rng, leaf, brand)
                        q.clicks[leaf] += 1
                        q.brand_clicks[b] += 1
                        q.title_clicks[t] += 1

    # ---- tables
    def knowledge(self, q: QueryRecord, k: int = 3) -> dict[str, list[str]]:
        """Posterior knowledge: the ``k`` most clicked categories (names), brands and titles."""
        top = lambda c: [x for x, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]  # noqa: E731
        return {"categories": [self.leaf_name[x] for x in top(q.clicks)], "brands": top(q.brand_clicks),
                "titles": top(q.title_clicks)}

    def rows(self) -> list[dict[str, Any]]:
        """One row per query: text, kind, gold, click labels, knowledge, counts."""
        out = []
        for q in self.queries:
            kn = self.knowledge(q)
            out.append({"query": q.text, "kind": q.kind, "gold": "|".join(q.gold),
                        "clicked": "|".join(q.click_labels(self.config.label_share)),
                        "clicked_categories": "|".join(kn["categories"]), "clicked_brands": "|".join(kn["brands"]),
                        "clicked_titles": "|".join(kn["titles"]), "impressions": q.impressions,
                        "clicks": int(sum(q.clicks.values()))})
        return out

    def label_info(self) -> dict[str, str]:
        """Catalogue side information per leaf (product words): what a shop knows about a category."""
        return {leaf: ", ".join(self.product_words[leaf]) for leaf in self.leaves}

    def summary(self) -> dict[str, Any]:
        rows = self.rows()
        labelled = [r for r in rows if r["clicked"]]
        gold = sum(len(r["gold"].split("|")) for r in labelled)
        covered = sum(len(set(r["gold"].split("|")) & set(r["clicked"].split("|"))) for r in labelled)
        return {"leaves": len(self.leaves), "queries": len(rows), "with_click_labels": len(labelled),
                "gold_labels_per_query": gold / max(1, len(labelled)),
                "click_coverage_of_gold": covered / max(1, gold),
                "kinds": dict(Counter(r["kind"] for r in rows))}


def split_rows(world: QueryWorld, seed: int = 0, test: float = 0.2, val: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """Queries split at random into ``train`` (rows with click labels only: what a click log
    gives), ``val`` (a small annotated dev set, gold labels) and ``test`` (gold labels; queries
    with or without clicks)."""
    rows = world.rows()
    idx = np.random.default_rng([seed, 7]).permutation(len(rows))
    n_test, n_val = int(round(test * len(rows))), int(round(val * len(rows)))
    te = [rows[int(i)] for i in idx[:n_test]]
    va = [rows[int(i)] for i in idx[n_test:n_test + n_val]]
    tr = [rows[int(i)] for i in idx[n_test + n_val:] if rows[int(i)]["clicked"]]
    return {"train": tr, "val": va, "test": te}
