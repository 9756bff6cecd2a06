// ruy's profiler is not used on a microcontroller: a no-op stand-in for the one header gemmlowp includes.
#ifndef RUY_PROFILER_INSTRUMENTATION_H_
#define RUY_PROFILER_INSTRUMENTATION_H_
namespace ruy { namespace profiler {
class ScopeLabel { public: template <typename... Args> explicit ScopeLabel(Args...) {} };
}}
#endif
