// A minimal llama.cpp client for scripts/verify_gguf_llamacpp.py: the peer's own tokenizer, forward
// pass and LoRA scaling (the code llama-server runs), driven through the C API.
//
//   probe MODEL [--lora FILE SCALE]... tokenize TEXT          -> token ids (no BOS, special tokens parsed)
//   probe MODEL [--lora FILE SCALE]... logits OUT.f32 ID...   -> float32 logits of every position to OUT
//   probe MODEL [--lora FILE SCALE]... greedy N ID...         -> up to N argmax tokens (stops at end of generation)
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL [--lora FILE SCALE]... tokenize|logits|greedy ...\n", argv[0]);
        return 2;
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    int i = 2;
    std::vector<llama_adapter_lora *> loras;
    std::vector<float> scales;
    while (i + 2 < argc && strcmp(argv[i], "--lora") == 0) {
        llama_adapter_lora * lora = llama_adapter_lora_init(model, argv[i + 1]);
        if (!lora) {
            fprintf(stderr, "cannot load adapter %s\n", argv[i + 1]);
            return 1;
        }
        loras.push_back(lora);
        scales.push_back((float) atof(argv[i + 2]));
        i += 3;
    }
    const std::string mode = argv[i++];
    if (mode == "tokenize") {
        const std::string text = argv[i];
        std::vector<llama_token> ids(text.size() + 8);
        const int n = llama_tokenize(vocab, text.c_str(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                                     /*add_special=*/false, /*parse_special=*/true);
        for (int k = 0; k < n; k++) printf("%d%s", ids[k], k + 1 < n ? " " : "\n");
        return n < 0;
    }
    std::string out_path;
    int n_new = 0;
    if (mode == "logits") out_path = argv[i++];
    else if (mode == "greedy") n_new = atoi(argv[i++]);
    std::vector<llama_token> prompt;
    for (; i < argc; i++) prompt.push_back(atoi(argv[i]));

    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t) (prompt.size() + n_new + 8);
    cparams.n_batch = cparams.n_ctx;
    cparams.n_ubatch = cparams.n_ctx;
    cparams.n_threads = cparams.n_threads_batch = 2;
    // fp32 attention end to end: the default f16 KV cache and the CPU flash-attention kernel (which
    // works in f16) each move logits by ~1e-3 on their own, above the fp32 comparison's tolerance.
    cparams.type_k = GGML_TYPE_F32;
    cparams.type_v = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    if (!loras.empty() && llama_set_adapters_lora(ctx, loras.data(), loras.size(), scales.data()) != 0) {
        fprintf(stderr, "cannot apply the adapters\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    llama_batch batch = llama_batch_init((int32_t) prompt.size(), 0, 1);
    for (size_t k = 0; k < prompt.size(); k++) {
        batch.token[k] = prompt[k];
        batch.pos[k] = (llama_pos) k;
        batch.n_seq_id[k] = 1;
        batch.seq_id[k][0] = 0;
        batch.logits[k] = mode == "logits" || k + 1 == prompt.size();
    }
    batch.n_tokens = (int32_t) prompt.size();
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "decode failed\n");
        return 1;
    }
    if (mode == "logits") {
        FILE * f = fopen(out_path.c_str(), "wb");
        for (size_t k = 0; k < prompt.size(); k++) fwrite(llama_get_logits_ith(ctx, (int32_t) k), sizeof(float), n_vocab, f);
        fclose(f);
        return 0;
    }
    int32_t last = -1;
    for (int step = 0; step < n_new; step++) {
        const float * logits = llama_get_logits_ith(ctx, last);
        llama_token best = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
        printf("%d%s", best, step + 1 < n_new ? " " : "");
        fflush(stdout);
        if (llama_vocab_is_eog(vocab, best)) break;
        llama_batch one = llama_batch_get_one(&best, 1);
        if (llama_decode(ctx, one) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
    }
    printf("\n");
    return 0;
}
