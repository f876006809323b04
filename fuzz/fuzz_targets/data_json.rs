//! Preference / unpaired / SFT data as JSON Lines or a JSON array: `read_records`, then `load_pairs`,
//! `load_unpaired` or `load_sft` (with the fixtures' tokenizer or none), then packing. See
//! `dpo_fuzz::data_settings` for what the first three bytes choose.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ext = match data.first() {
        Some(flags) if flags & 32 != 0 => "json",
        _ => "jsonl",
    };
    dpo_fuzz::fuzz_data(data, ext);
});
