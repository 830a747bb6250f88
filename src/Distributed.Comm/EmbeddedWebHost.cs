using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.Logging;

namespace Distributed.Comm;

/// <summary>
/// The builder of every Kestrel server a dtrain process embeds (data plane, metrics and status, health probes).
/// ASP.NET's defaults watch the content root (the working directory) for appsettings changes, recursively: every
/// line a run writes under it (metrics.jsonl, checkpoints, TensorBoard events) woke a watcher thread, 150+ times a
/// second, on the cores training needs. dtrain reads no appsettings, so nothing is watched, the content root is the
/// install directory (a stray appsettings.json in the working directory changes nothing), and ASP.NET logs nowhere.
/// </summary>
public static class EmbeddedWebHost
{
    public static WebApplicationBuilder CreateBuilder()
    {
        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions
        {
            Args = ["--hostBuilder:reloadConfigOnChange=false"],
            ContentRootPath = AppContext.BaseDirectory,
        });
        builder.Logging.ClearProviders();
        return builder;
    }
}
