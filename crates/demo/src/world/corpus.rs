//! A seeded generator of short English movie reviews, standing in for IMDb in the sentiment
//! experiment. Every word comes from the lists below (written for this project, so the corpus is
//! license-clean and needs no download).
//!
//! What the experiment needs from it: a small GPT trained on these must continue a neutral prefix
//! ("The acting in", "I watched Silver Harbor last night and") in *either* direction, so that
//! preference optimisation against a sentiment scorer has room to move. Hence every review is a
//! sentiment-free lead followed by toned clauses, the five tones are equally likely after every lead,
//! and most sentiment words are ones VADER scores (a few it does not, like "tedious" or "gripping",
//! so the scorer is imperfect, as a learned classifier would be).

use engine::rng::Rng;

/// The sentiment a review was written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tone {
    StrongNeg,
    MildNeg,
    Mixed,
    MildPos,
    StrongPos,
}

impl Tone {
    pub const ALL: [Tone; 5] = [Tone::StrongNeg, Tone::MildNeg, Tone::Mixed, Tone::MildPos, Tone::StrongPos];

    fn index(self) -> usize {
        self as usize
    }

    fn is_strong(self) -> bool {
        matches!(self, Tone::StrongNeg | Tone::StrongPos)
    }
}

/// One generated review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Review {
    pub tone: Tone,
    pub text: String,
    /// How many leading words carry no sentiment (the lead); prompts are cut from them.
    pub neutral_words: usize,
}

/// Reviews are kept to this many words (split on whitespace), like the paper's short IMDb prefixes
/// plus completions.
pub const MIN_WORDS: usize = 8;
pub const MAX_WORDS: usize = 30;

/// `n` reviews, reproducible from `seed`, tones in equal proportion on average.
pub fn reviews(seed: u64, n: usize) -> Vec<String> {
    labelled_reviews(seed, n).into_iter().map(|r| r.text).collect()
}

/// `n` reviews with the tone each was written with.
pub fn labelled_reviews(seed: u64, n: usize) -> Vec<Review> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| review(&mut rng)).collect()
}

/// Salt for the prompt stream, so `prompts(s, ..)` are not prefixes of the very reviews in `reviews(s, ..)`.
const PROMPT_SALT: u64 = 0x5EED_0F9E_0D7A_1100;

/// `n` prompts: the first 2 to 8 words of held-out reviews, cut inside their sentiment-free lead
/// ("The movie was", "I watched this drama", "The acting in The Glass Orchard").
pub fn prompts(seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng::new(seed ^ PROMPT_SALT);
    (0..n)
        .map(|_| {
            let r = review(&mut rng);
            // Every lead has at least two words (see `lead`); the clamp only guards that invariant.
            let most = r.neutral_words.clamp(2, 8);
            let k = 2 + rng.below(most - 1);
            r.text.split_whitespace().take(k).collect::<Vec<_>>().join(" ")
        })
        .collect()
}

fn review(rng: &mut Rng) -> Review {
    let tone = Tone::ALL[rng.below(Tone::ALL.len())];
    // Rejection keeps the length bounds without biasing the tone (it is drawn once, outside the loop).
    loop {
        let (lead, slot) = lead(rng);
        let mut text = format!("{lead} {}", toned(rng, slot, tone));
        let extra = rng.below(3); // one to three clauses in all
        for _ in 0..extra {
            text.push(' ');
            text.push_str(&extra_clause(rng, tone));
        }
        let words = text.split_whitespace().count();
        if (MIN_WORDS..=MAX_WORDS).contains(&words) {
            return Review { tone, text, neutral_words: lead.split_whitespace().count() };
        }
    }
}

/// What the lead leaves open: an adjective phrase after "was" / "is", or a verb phrase after "I".
#[derive(Clone, Copy)]
enum Slot {
    Adjective,
    Feeling,
}

/// The sentiment-free opening of a review, and the slot it ends in.
fn lead(rng: &mut Rng) -> (String, Slot) {
    use Slot::*;
    let t = title(rng);
    let (genre, genres) = pick2(rng, GENRES);
    let film = pick(rng, FILM);
    let aspect = pick(rng, ASPECTS);
    let when = pick(rng, WHEN);
    match rng.below(16) {
        0 => (format!("This {film} was"), Adjective),
        1 => (format!("The {film} was"), Adjective),
        2 => (format!("This {genre} is"), Adjective),
        3 => (format!("{t} was"), Adjective),
        4 => (format!("I watched {t} {when} and it was"), Adjective),
        5 => (format!("I watched this {genre} {when} and I"), Feeling),
        6 => (format!("The {aspect} in {t} was"), Adjective),
        7 => (format!("Frankly, the {aspect} was"), Adjective),
        8 => ("Frankly, I".to_string(), Feeling),
        9 => {
            let actor = actor(rng);
            (format!("{t} is {} {genre} starring {actor}. The {aspect} was", article(genre)), Adjective)
        }
        10 => (format!("I saw {t} with {} {when}, and I", pick(rng, COMPANY)), Feeling),
        11 => (format!("As someone who watches a lot of {genres}, I"), Feeling),
        12 => {
            let (actor, role) = (actor(rng), pick(rng, ROLES));
            (format!("{actor} stars as {} {role} in {t}, and the performance was", article(role)), Adjective)
        }
        13 => (format!("{} chose {t} for movie night, and I", cap(pick(rng, COMPANY))), Feeling),
        14 => (format!("After a long week I finally watched {t}, and it was"), Adjective),
        _ => {
            let (role, place) = (pick(rng, ROLES), pick(rng, PLACES));
            (format!("The {film} follows {} {role} in {place}. The {aspect} was", article(role)), Adjective)
        }
    }
}

/// The first toned clause, filling the lead's slot; ends the sentence.
fn toned(rng: &mut Rng, slot: Slot, tone: Tone) -> String {
    let body = match slot {
        Slot::Adjective => adjective(rng, tone),
        Slot::Feeling => pick(rng, FEELINGS[tone.index()]).to_string(),
    };
    format!("{body}{}", stop(rng, tone))
}

/// A later clause: another aspect, a performer, or a closing verdict, in the review's tone. Mixed
/// reviews also get contrasts ("good, but ... weak") and plain statements of fact.
fn extra_clause(rng: &mut Rng, tone: Tone) -> String {
    let aspect = pick(rng, ASPECTS);
    match rng.below(3) {
        0 if tone == Tone::Mixed => {
            let other = pick(rng, ASPECTS);
            let (good, bad) =
                (pick(rng, ADJECTIVES[Tone::MildPos.index()]), pick(rng, ADJECTIVES[Tone::MildNeg.index()]));
            match rng.below(3) {
                0 => format!("The {aspect} was {good}, but the {other} was {bad}."),
                1 => format!("The {aspect} was {bad}, but the {other} was {good}."),
                _ => cap(&format!("{}.", pick(rng, FACTS))),
            }
        }
        0 => format!("The {aspect} was {}{}", adjective(rng, tone), stop(rng, tone)),
        1 => format!("{} was {}{}", actor(rng), pick(rng, PERFORMANCES[tone.index()]), stop(rng, tone)),
        _ => pick(rng, VERDICTS[tone.index()]).to_string(),
    }
}

/// An adjective phrase of the tone; strong single adjectives sometimes get an intensifier.
fn adjective(rng: &mut Rng, tone: Tone) -> String {
    let a = pick(rng, ADJECTIVES[tone.index()]);
    if tone.is_strong() && !a.contains(' ') && rng.below(3) == 0 {
        format!("{} {a}", pick(rng, INTENSIFIERS))
    } else {
        a.to_string()
    }
}

fn stop(rng: &mut Rng, tone: Tone) -> &'static str {
    if tone.is_strong() && rng.below(4) == 0 {
        "!"
    } else {
        "."
    }
}

fn title(rng: &mut Rng) -> String {
    let (a, b) = (pick(rng, TITLE_FIRST), pick(rng, TITLE_SECOND));
    match rng.below(3) {
        0 => format!("{a} {b}"),
        1 => format!("The {a} {b}"),
        _ => format!("The {b}"),
    }
}

fn actor(rng: &mut Rng) -> String {
    format!("{} {}", pick(rng, FIRST_NAMES), pick(rng, LAST_NAMES))
}

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len())]
}

fn pick2<'a>(rng: &mut Rng, xs: &[(&'a str, &'a str)]) -> (&'a str, &'a str) {
    xs[rng.below(xs.len())]
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

// ---- Word lists. Everything a lead is built from must be sentiment-free to VADER (tested in
// sentiment.rs), which rules out e.g. "comedy", "thriller", "horror", "crime", "friends", "hero".

const FILM: &[&str] = &["movie", "film", "picture"];
/// (singular, plural)
const GENRES: &[(&str, &str)] = &[
    ("drama", "dramas"),
    ("mystery", "mysteries"),
    ("western", "westerns"),
    ("musical", "musicals"),
    ("documentary", "documentaries"),
    ("science fiction film", "science fiction films"),
    ("period drama", "period dramas"),
    ("heist movie", "heist movies"),
    ("road movie", "road movies"),
    ("animated film", "animated films"),
    ("courtroom drama", "courtroom dramas"),
    ("detective story", "detective stories"),
    ("biopic", "biopics"),
    ("family film", "family films"),
];
const ASPECTS: &[&str] = &[
    "acting",
    "plot",
    "story",
    "script",
    "dialogue",
    "pacing",
    "ending",
    "soundtrack",
    "music",
    "cinematography",
    "camera work",
    "cast",
    "lead performance",
    "direction",
    "editing",
    "effects work",
    "costume design",
    "first half",
    "second half",
    "final act",
];
const TITLE_FIRST: &[&str] = &[
    "Silver", "Midnight", "Northern", "Paper", "Hollow", "Crimson", "Glass", "Iron", "Velvet", "Distant", "Hidden",
    "Winter", "Summer", "Electric", "Painted", "Seventh", "Copper", "Amber", "Western", "Salt",
];
const TITLE_SECOND: &[&str] = &[
    "Harbor",
    "Orchard",
    "Lantern",
    "Station",
    "Garden",
    "River",
    "Avenue",
    "Horizon",
    "Tide",
    "Mountain",
    "Letters",
    "Signal",
    "Compass",
    "Island",
    "Frontier",
    "Lighthouse",
    "Parade",
    "Machine",
    "Bridge",
    "Kingdom",
];
const FIRST_NAMES: &[&str] = &[
    "Anna", "Marcus", "Elena", "Tom", "Priya", "Jonas", "Clara", "Diego", "Mei", "Oscar", "Ruth", "Samuel", "Ines",
    "Victor", "Nora", "Felix", "Lena", "Hugo",
];
const LAST_NAMES: &[&str] = &[
    "Hale",
    "Moreno",
    "Lindqvist",
    "Okafor",
    "Brandt",
    "Castillo",
    "Reyes",
    "Whitford",
    "Novak",
    "Tanaka",
    "Duval",
    "Sorensen",
    "Quinn",
    "Achebe",
    "Kowalski",
    "Marsh",
];
const ROLES: &[&str] = &[
    "retired detective",
    "young teacher",
    "ship captain",
    "small town doctor",
    "jazz pianist",
    "chess player",
    "farmer",
    "lighthouse keeper",
    "journalist",
    "astronaut",
    "baker",
    "taxi driver",
    "lawyer",
];
const PLACES: &[&str] = &[
    "a small town",
    "Lisbon",
    "a fishing village",
    "the city",
    "the mountains",
    "a boarding school",
    "the desert",
    "a space station",
];
const WHEN: &[&str] = &[
    "last night",
    "on Sunday",
    "yesterday",
    "over the weekend",
    "on a long flight",
    "at the cinema",
    "at home",
    "on television",
];
const COMPANY: &[&str] =
    &["my sister", "my brother", "my parents", "a colleague", "my neighbour", "my cousin", "my partner"];
/// Plain statements, used by mixed reviews as neutral filler.
const FACTS: &[&str] = &[
    "it runs about two hours",
    "it was shot in black and white",
    "the story takes place over one summer",
    "the director also wrote the script",
    "it is based on a novel",
    "most of it is set on a train",
];

// ---- Tone-bearing lists, indexed by `Tone::index()`: strong neg, mild neg, mixed, mild pos, strong pos.

const INTENSIFIERS: &[&str] = &["really", "truly", "absolutely", "so", "extremely"];

/// After "was" / "is".
const ADJECTIVES: [&[&str]; 5] = [
    &[
        "terrible",
        "awful",
        "a complete waste of time",
        "horrible",
        "the worst I have ever seen",
        "painfully boring",
        "a disaster",
        "stupid and ugly",
        "dreadful",
        "pathetic",
        "a total mess",
        "unbearable",
    ],
    &[
        "a bit weak",
        "disappointing",
        "rather dull",
        "not very good",
        "a little boring",
        "messy",
        "tedious",
        "not great",
        "somewhat lazy",
        "forgettable",
        "weak",
        "dull",
    ],
    &[
        "okay",
        "fine",
        "average",
        "ordinary",
        "about what I expected",
        "neither here nor there",
        "uneven",
        "nothing special",
        "hit and miss",
        "a mixed bag",
        "watchable",
        "fine in places and weak in others",
        "mediocre",
    ],
    &[
        "fairly good",
        "somewhat enjoyable",
        "nice",
        "solid",
        "fun",
        "good",
        "better than I expected",
        "decent",
        "pleasant",
        "fairly clever",
        "funny in places",
        "sweet",
    ],
    &[
        "brilliant",
        "wonderful",
        "a masterpiece",
        "excellent",
        "amazing",
        "superb",
        "beautiful",
        "fantastic",
        "a pure delight",
        "stunning",
        "perfect",
        "one of the best I have seen",
        "gorgeous",
        "gripping",
    ],
];

/// After "I" (past tense).
const FEELINGS: [&[&str]; 5] = [
    &[
        "hated it",
        "hated every minute of it",
        "regretted watching it",
        "was bored to tears",
        "found it stupid and ugly",
        "wanted my money back",
    ],
    &[
        "was a bit bored",
        "did not enjoy it much",
        "was disappointed",
        "found it dull",
        "nearly fell asleep",
        "found it weak",
    ],
    &[
        "did not know what to think",
        "felt mixed about it",
        "watched it to the end",
        "have no real opinion",
        "thought it was okay",
        "found it average",
    ],
    &["enjoyed it", "liked it", "had a good time", "mostly enjoyed it", "was mildly surprised", "found it decent"],
    &[
        "loved it",
        "loved every minute of it",
        "adored it",
        "laughed the whole time",
        "had a wonderful time",
        "thought it was wonderful",
    ],
];

/// After an actor's name and "was".
const PERFORMANCES: [&[&str]; 5] = [
    &["awful in the lead", "terrible as always", "embarrassing to watch", "painfully bad"],
    &["a bit stiff", "weak in the lead", "not convincing", "rather boring"],
    &["fine in a small role", "okay in the lead", "neither here nor there", "on screen for ten minutes"],
    &["good in the lead", "somewhat charming", "fairly funny", "nice to watch"],
    &["brilliant in the lead", "wonderful as always", "a joy to watch", "outstanding"],
];

/// Closing sentences.
const VERDICTS: [&[&str]; 5] = [
    &[
        "Avoid it.",
        "I hated every minute.",
        "A waste of money.",
        "One out of ten.",
        "What a waste of time.",
        "Simply awful.",
    ],
    &[
        "Probably skip it.",
        "Not worth the ticket.",
        "I was a bit disappointed.",
        "Four out of ten.",
        "Wait for it on television.",
        "Sadly forgettable.",
    ],
    &[
        "It is what it is.",
        "Make of that what you will.",
        "Five out of ten.",
        "Your mileage may vary.",
        "I have no real opinion about it.",
        "Decide for yourself.",
    ],
    &[
        "Worth a watch.",
        "I enjoyed it.",
        "Not bad at all.",
        "A nice way to spend an evening.",
        "I would recommend it.",
        "Seven out of ten.",
    ],
    &[
        "Highly recommended!",
        "I loved every minute of it.",
        "A must see.",
        "I would happily watch it again.",
        "Easily the best film of the year.",
        "Ten out of ten.",
    ],
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn reproducible_and_seed_dependent() {
        assert_eq!(reviews(1, 50), reviews(1, 50));
        assert_ne!(reviews(1, 50), reviews(2, 50));
        assert_eq!(prompts(3, 20), prompts(3, 20));
    }

    #[test]
    fn lengths_tones_and_variety() {
        let rs = labelled_reviews(7, 5000);
        for r in &rs {
            let w = r.text.split_whitespace().count();
            assert!((MIN_WORDS..=MAX_WORDS).contains(&w), "{w} words: {}", r.text);
            assert!(r.neutral_words >= 2 && r.neutral_words < w, "{r:?}");
        }
        for tone in Tone::ALL {
            let share = rs.iter().filter(|r| r.tone == tone).count() as f64 / rs.len() as f64;
            assert!((0.17..0.23).contains(&share), "{tone:?}: {share}");
        }
        let distinct: HashSet<&str> = rs.iter().map(|r| r.text.as_str()).collect();
        assert!(distinct.len() > 4900, "only {} distinct reviews", distinct.len());
        let openings: HashSet<String> =
            rs.iter().map(|r| r.text.split_whitespace().take(2).collect::<Vec<_>>().join(" ")).collect();
        assert!(openings.len() > 50, "{} openings", openings.len());
    }

    #[test]
    fn every_lead_is_followed_by_every_tone() {
        // The property the experiment rests on: the lead says nothing about what follows.
        let rs = labelled_reviews(11, 20000);
        let mut seen: std::collections::HashMap<&str, HashSet<Tone>> = Default::default();
        for r in &rs {
            let first = r.text.split_whitespace().next().unwrap_or_default();
            seen.entry(first).or_default().insert(r.tone);
        }
        for (w, tones) in &seen {
            assert_eq!(tones.len(), 5, "{w}: {tones:?}");
        }
    }

    #[test]
    fn prompts_are_short_prefixes_of_the_lead() {
        let ps = prompts(5, 2000);
        for p in &ps {
            let w = p.split_whitespace().count();
            assert!((2..=8).contains(&w), "{p}");
        }
        let lengths: HashSet<usize> = ps.iter().map(|p| p.split_whitespace().count()).collect();
        assert_eq!(lengths.len(), 7, "{lengths:?}");
        let distinct: HashSet<&String> = ps.iter().collect();
        assert!(distinct.len() > 500, "{}", distinct.len());
    }
}
